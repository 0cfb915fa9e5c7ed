"""Explain an image with an exported ProtoPool ONNX model, without torch: onnxruntime, numpy and PIL only.

    protopool-hf export demo-output/model demo.onnx
    python examples/onnx_explain.py demo.onnx image.png --model-dir demo-output/model --out explanation.png

The ONNX file (written by `protopool_hf.export_onnx`) returns the logits, every slot's similarity and every
prototype's activation map; its `protopool.*` metadata holds the class names, the preprocessing, each slot's
prototype and the last-layer weights. The model folder gives `preprocessor_config.json` (the same preprocessing,
which wins when both exist) and the prototypes' pictures (`prototypes/prototype_NNN.png` and `_overlay.png`).

The picture: the image as the model saw it with its top classes, then the slots that add most to the explained
class's logit (similarity × weight), each with where it fired on the image (the φ map of its prototype, upsampled,
with the box of its top 5 % pixels) next to the prototype's own pictures. With a soft (not hardened) assignment each
slot mixes prototypes; the map shown is the dominant prototype's.

The preprocessing follows the stock transformers processor that `preprocessor_config.json` names (PIL backend):
`BitImageProcessor` (what `save_pretrained` writes) resizes to `size` (height × width, or the shorter side to
`shortest_edge`), crops the centre `crop_size` with a floored offset; then rescale to [0, 1] and normalise.
"""

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont


OUTPUTS = ("logits", "similarities", "min_distances", "activations")
PREFIX = "protopool."
FORMAT_VERSION = "1"


# ----------------------------------------------------------------------------------------------- model and metadata
def read_metadata(session: onnxruntime.InferenceSession, path: Path) -> dict[str, Any]:
    """The `protopool.*` metadata props of an ONNX session, decoded; `last_layer_weight` as a `(C, C·S)` array."""
    props = session.get_modelmeta().custom_metadata_map
    found = props.get(PREFIX + "format_version")
    if found != FORMAT_VERSION:
        raise ValueError(
            f"{path} has no ProtoPool metadata of format {FORMAT_VERSION} (found {found!r}): export the model with "
            "`protopool-hf export MODEL out.onnx`."
        )
    meta = {key[len(PREFIX) :]: json.loads(value) for key, value in props.items() if key.startswith(PREFIX)}
    raw = base64.b64decode(meta["last_layer_weight"])
    meta["last_layer_weight"] = np.frombuffer(raw, dtype="<f4").reshape(meta["last_layer_shape"]).astype(np.float32)
    return meta


# ----------------------------------------------------------------------------------------------- preprocessing
def _resize(image: PIL.Image.Image, height: int, width: int, resample: int) -> PIL.Image.Image:
    return image.resize((width, height), resample=PIL.Image.Resampling(resample))


def model_view(image: PIL.Image.Image, processor: dict[str, Any]) -> PIL.Image.Image:
    """The RGB image the model sees, before rescaling and normalisation: the processor's resize and centre crop.

    Follows transformers' semantics for the fields `save_pretrained` writes (`BitImageProcessor`): `size` as height and
    width, or as `shortest_edge` (the shorter side resized to it, the longer one `int(edge * long / short)`); then, with
    `do_center_crop`, the centre `crop_size` with a floored offset. Folders saved by older versions
    (`ConvNextImageProcessor` with `crop_pct`, `ViTImageProcessor`) are followed too.
    """
    image = image.convert("RGB")
    size, resample = processor.get("size", {}), int(processor.get("resample", 3))
    kind = processor.get("image_processor_type", "")
    if kind.startswith("ConvNextImageProcessor") and "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        if edge >= 384:  # transformers' ConvNeXt processor warps to a square at 384 px and above
            return _resize(image, edge, edge, resample)
        image = _resize_shortest_edge(image, int(edge / float(processor.get("crop_pct", 224 / 256))), resample)
        return _centre_crop(image, edge, edge)
    if processor.get("do_resize", True):
        if "height" in size and "width" in size:
            image = _resize(image, int(size["height"]), int(size["width"]), resample)
        elif "shortest_edge" in size:
            image = _resize_shortest_edge(image, int(size["shortest_edge"]), resample)
        else:
            raise ValueError(
                f"preprocessor_config.json: size {size} of image_processor_type {kind!r} is not one this script "
                "follows (height and width, or shortest_edge): re-save the model folder with protopool_hf."
            )
    if processor.get("do_center_crop", False):
        crop = processor["crop_size"]
        image = _centre_crop(image, int(crop["height"]), int(crop["width"]))
    return image


def _resize_shortest_edge(image: PIL.Image.Image, edge: int, resample: int) -> PIL.Image.Image:
    width, height = image.size
    if width <= height:
        return _resize(image, int(edge * height / width), edge, resample)
    return _resize(image, edge, int(edge * width / height), resample)


def _centre_crop(image: PIL.Image.Image, height: int, width: int) -> PIL.Image.Image:
    top, left = (image.height - height) // 2, (image.width - width) // 2
    return image.crop((left, top, left + width, top + height))


def preprocess(image: PIL.Image.Image, processor: dict[str, Any]) -> tuple[np.ndarray, PIL.Image.Image]:
    """`(1, 3, H_in, W_in)` float32 pixel values and the model view, as the stock PIL-backend processor computes them."""
    view = model_view(image, processor)
    pixels = np.asarray(view, dtype=np.uint8)
    values = pixels.astype(np.float32)
    if processor.get("do_rescale", True):
        values = (pixels.astype(np.float64) * float(processor.get("rescale_factor", 1 / 255))).astype(np.float32)
    if processor.get("do_normalize", True):
        mean = np.asarray(processor["image_mean"], dtype=np.float32)
        std = np.asarray(processor["image_std"], dtype=np.float32)
        values = (values - mean) / std
    return values.transpose(2, 0, 1)[None].astype(np.float32), view


# ----------------------------------------------------------------------------------------------- pictures
def jet(values: np.ndarray) -> np.ndarray:
    """`(H, W)` values in [0, 1] -> `(H, W, 3)` uint8 colours of the JET colour map."""
    v = np.clip(values, 0.0, 1.0)
    channels = [np.clip(1.5 - np.abs(4.0 * v - shift), 0.0, 1.0) for shift in (3.0, 2.0, 1.0)]
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)


def upsample(activation: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(H, W)` map -> `(H_in, W_in)` float32, bicubic (PIL's float mode)."""
    image = PIL.Image.fromarray(activation.astype(np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), resample=PIL.Image.Resampling.BICUBIC), dtype=np.float32)


def high_activation_box(activation: np.ndarray, percentile: float = 95) -> tuple[int, int, int, int]:
    """`(top, bottom, left, right)` of the pixels at or above the map's percentile (bottom, right exclusive)."""
    rows, cols = np.nonzero(activation >= np.percentile(activation, percentile))
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def heat_overlay(view: PIL.Image.Image, activation: np.ndarray) -> PIL.Image.Image:
    """The view blended with the JET heat map of `activation` (upsampled to it), with its high-activation box."""
    full = upsample(activation, (view.height, view.width))
    span = float(full.max() - full.min())
    normalised = (full - full.min()) / span if span > 0 else np.zeros_like(full)
    blended = 0.5 * np.asarray(view, dtype=np.float32) + 0.5 * jet(normalised).astype(np.float32)
    picture = PIL.Image.fromarray(blended.round().astype(np.uint8), mode="RGB")
    top, bottom, left, right = high_activation_box(full)
    PIL.ImageDraw.Draw(picture).rectangle((left, top, right - 1, bottom - 1), outline=(255, 255, 0), width=2)
    return picture


def prototype_pictures(model_dir: Path | None, prototype: int) -> list[PIL.Image.Image]:
    """The prototype's source image with its box (overlay) and its crop, from `<model_dir>/prototypes/`."""
    if model_dir is None:
        return []
    folder = model_dir / "prototypes"
    stem = f"prototype_{prototype:03d}"
    pictures = []
    for name in (f"{stem}_overlay.png", f"{stem}_source.png", f"{stem}.png"):
        if (folder / name).is_file() and not (name.endswith("_source.png") and pictures):
            with PIL.Image.open(folder / name) as image:
                pictures.append(image.convert("RGB"))
    return pictures


def _fit(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    canvas = PIL.Image.new("RGB", (size, size), (240, 240, 240))
    scale = min(size / image.width, size / image.height)
    thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    canvas.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    return canvas


# ----------------------------------------------------------------------------------------------- explanation
def explain(
    session: onnxruntime.InferenceSession,
    meta: dict[str, Any],
    image: PIL.Image.Image,
    processor: dict[str, Any],
    *,
    top_k: int = 3,
    class_id: int | None = None,
) -> dict[str, Any]:
    """Run the model on one image; the top classes and every slot's contribution to one class's logit."""
    pixel_values, view = preprocess(image, processor)
    logits, similarities, _, activations = session.run(list(OUTPUTS), {"pixel_values": pixel_values})
    logits64 = logits[0].astype(np.float64)
    probabilities = np.exp(logits64 - logits64.max())
    probabilities /= probabilities.sum()
    names = meta["id2label"]
    order = np.argsort(-probabilities, kind="stable")[: min(top_k, len(names))]
    explained = int(order[0]) if class_id is None else class_id
    if not 0 <= explained < len(names):
        raise ValueError(f"--class-id must be in [0, {len(names)}) for this model's classes, got {explained}.")
    num_slots = similarities.shape[2]
    flat = similarities[0].reshape(-1)
    weights = meta["last_layer_weight"][explained]
    slots = []
    for j in np.nonzero(weights)[0]:
        owner, slot = divmod(int(j), num_slots)
        prototype = int(meta["slot_prototypes"][owner][slot])
        slots.append(
            {
                "class_id": owner,
                "slot": slot,
                "prototype_id": prototype,
                "similarity": float(flat[j]),
                "weight": float(weights[j]),
                "contribution": float(weights[j]) * float(flat[j]),
                "activation": activations[0, prototype],
            }
        )
    slots.sort(key=lambda s: s["contribution"], reverse=True)
    return {
        "view": view,
        "top_classes": [(int(c), names[c], float(probabilities[c])) for c in order],
        "predicted_class": int(order[0]),
        "class_id": explained,
        "logit": float(logits[0, explained]),
        "slots": slots,
    }


def render(explanation: dict[str, Any], meta: dict[str, Any], model_dir: Path | None, max_slots: int = 3) -> Any:
    """The "this looks like that" picture: the input and top classes, then one row per top slot."""
    thumb, margin, gap, text_w = 160, 16, 12, 280
    font = PIL.ImageFont.load_default()
    names = meta["id2label"]
    shown = explanation["slots"][:max_slots]
    width = 2 * margin + 3 * thumb + 3 * gap + text_w
    header = thumb + gap
    height = 2 * margin + header + len(shown) * (thumb + gap) + 30
    canvas = PIL.Image.new("RGB", (width, height), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(canvas)
    canvas.paste(_fit(explanation["view"], thumb), (margin, margin))
    x, y = margin + thumb + 2 * gap, margin
    predicted = explanation["predicted_class"]
    draw.text((x, y), f"Prediction: {names[predicted]}", fill=(0, 0, 0), font=font)
    for rank, (_, label, p) in enumerate(explanation["top_classes"], start=1):
        draw.text((x, y + 18 * rank), f"{rank}. {label}  {p:.1%}", fill=(40, 40, 40), font=font)
    why = f"Why {names[explanation['class_id']]}? logit {explanation['logit']:.3f}: top {len(shown)} slots"
    draw.text((x, y + 18 * (len(explanation["top_classes"]) + 1)), why, fill=(0, 0, 0), font=font)
    y = margin + header
    for slot in shown:
        canvas.paste(_fit(heat_overlay(explanation["view"], slot["activation"]), thumb), (margin, y))
        pictures = prototype_pictures(model_dir, slot["prototype_id"])
        for k, picture in enumerate(pictures[:2]):
            canvas.paste(_fit(picture, thumb), (margin + (k + 1) * (thumb + gap), y))
        if not pictures:
            draw.text(
                (margin + thumb + gap, y + thumb // 2), "(no prototype picture)", fill=(120, 120, 120), font=font
            )
        tx = margin + 3 * (thumb + gap)
        lines = [
            "looks like",
            f"prototype {slot['prototype_id']}",
            f"slot {slot['slot']} of {names[slot['class_id']]}",
            f"similarity {slot['similarity']:.3f}",
            f"x weight {slot['weight']:.3f}",
            f"= {slot['contribution']:+.3f}",
        ]
        for k, line in enumerate(lines):
            draw.text((tx, y + 4 + 18 * k), line, fill=(0, 0, 0), font=font)
        y += thumb + gap
    total = sum(s["contribution"] for s in explanation["slots"])
    footer = (
        f"sum of all {len(explanation['slots'])} slot contributions {total:+.3f} = logit {explanation['logit']:.3f}"
    )
    if not meta.get("hard_assignment", True):
        footer += "; soft assignment: the dominant prototype's map is shown"
    draw.text((margin, y + 4), footer, fill=(90, 90, 90), font=font)
    return canvas


# ----------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the .onnx file written by `protopool-hf export`")
    parser.add_argument("image", type=Path)
    parser.add_argument("--model-dir", type=Path, help="the model folder: preprocessor_config.json and prototypes/")
    parser.add_argument("--out", type=Path, default=Path("explanation.png"), help="PNG file to write")
    parser.add_argument("--top-k", type=int, default=3, help="classes to list")
    parser.add_argument("--class-id", type=int, help="explain this class instead of the predicted one")
    parser.add_argument("--max-slots", type=int, default=3, help="slots to draw")
    parser.add_argument("--json", action="store_true", help="also print the explanation as JSON")
    args = parser.parse_args(argv)
    for path, what in ((args.model, "ONNX file"), (args.image, "image")):
        if not path.is_file():
            parser.error(f"the {what} {str(path)!r} does not exist")
    if args.model_dir is not None and not args.model_dir.is_dir():
        parser.error(f"--model-dir {str(args.model_dir)!r} is not a folder")
    if args.out.exists() and args.out.resolve() in (args.model.resolve(), args.image.resolve()):
        parser.error(f"--out {str(args.out)!r} would overwrite an input")

    session = onnxruntime.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    try:
        meta = read_metadata(session, args.model)
    except ValueError as error:
        parser.error(str(error))
    processor = meta["preprocessor_config"]
    if args.model_dir is not None and (args.model_dir / "preprocessor_config.json").is_file():
        processor = json.loads((args.model_dir / "preprocessor_config.json").read_text())
    with PIL.Image.open(args.image) as image:
        explanation = explain(session, meta, image, processor, top_k=args.top_k, class_id=args.class_id)
    picture = render(explanation, meta, args.model_dir, args.max_slots)
    temporary = args.out.with_name(f".{args.out.name}.tmp")
    picture.save(temporary, format="PNG")
    temporary.replace(args.out)
    top = ", ".join(f"{label} {p:.1%}" for _, label, p in explanation["top_classes"])
    print(f"{args.image}: {top}")
    if args.json:
        slots = [{k: v for k, v in s.items() if k != "activation"} for s in explanation["slots"]]
        keys = ("top_classes", "class_id", "logit")
        print(json.dumps({**{key: explanation[key] for key in keys}, "slots": slots}))
    print(f"Explanation written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
