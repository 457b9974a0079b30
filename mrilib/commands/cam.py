"""``python -m mrilib cam``: the Grad-CAM overlay of one scan for a saved classifier."""
from __future__ import annotations

import io
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("cam", help="Grad-CAM overlay of one scan for a saved classifier")
    p.add_argument("--image", required=True, metavar="PATH",
                   help="the scan: a grayscale or RGB image file of any size (padded to "
                        "square and resized to the model's image size)")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a classifier written by mrilib.checkpoints.save_checkpoint (it holds "
                        "the model name and image size)")
    p.add_argument("--target", default=None, metavar="CLASS",
                   help="class to explain: a name (Moderate_Demented, ModerateDemented...) "
                        "or an index 0-3 (default: the predicted class)")
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="dotted layer name to explain, e.g. layer3 or blocks.-2.norm1 "
                        "(default: act2, layer4 or blocks.-1.norm1 by model)")
    p.add_argument("--out", required=True, metavar="PNG", help="PNG file to write")
    p.set_defaults(func=run)


def explain_scan(image, checkpoint, target=None, layer=None) -> dict:
    """Scan, CAM, prediction and its probability, explained class and layer, for one file."""
    from ..cam import (class_index, class_probabilities, gradcam_maps, layer_name, read_scan,
                       target_layer)
    from ..data import CLASSES
    from ..checkpoints import load_checkpoint

    model, config = load_checkpoint(checkpoint)
    classes = tuple(config.get("classes", CLASSES))
    if len(classes) != config["num_classes"]:
        raise ValueError(f"checkpoint {str(checkpoint)!r} has {config['num_classes']} "
                         f"classes but names for {len(classes)} ({', '.join(classes)}); "
                         f"save the class names in its config under 'classes'")
    scan = read_scan(image, config["img_size"])
    probs = class_probabilities(model, scan[None])[0]
    predicted = int(probs.argmax())
    chosen = predicted if target is None else class_index(target, classes)
    return {
        "scan": scan,
        "cam": gradcam_maps(model, scan[None], chosen, layer, classes)[0],
        "model": config["model"],
        "predicted": classes[predicted],
        "probability": float(probs[predicted]),
        "target": classes[chosen],
        "layer": layer_name(model, target_layer(model, layer)),
    }


def run(args) -> int:
    import matplotlib.pyplot as plt

    from ..cam import NO_EVIDENCE, no_evidence
    from ..paths import atomic_write_bytes, check_writable
    from ..plots.cam import scan_cam_figure

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {str(out)!r} must name a .png file")
    check_writable(out, "--out", kind="file")
    info = explain_scan(args.image, args.checkpoint, args.target, args.layer)
    fig = scan_cam_figure(info["scan"], info["cam"], info["predicted"], info["probability"],
                          info["target"], f"{info['model']}.{info['layer']}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    print(f"predicted {info['predicted']} (p = {info['probability']:.3f}); Grad-CAM for "
          f"{info['target']} at {info['model']}.{info['layer']} -> {out}")
    if no_evidence(info["cam"]):
        print(f"the map is {NO_EVIDENCE.format(target=info['target'])} (the panel shows the "
              f"bare scan); try the predicted class or another --layer")
    return 0
