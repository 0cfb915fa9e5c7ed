"""The explorer: a gradio app to see why a ProtoPool model decided, in the browser ("this looks like that").

`build_app(model_or_path)` returns a `gradio.Blocks` with four tabs:

- **Explain**: upload an image (or pick one of the model folder's `examples/`) -> the top-k classes with their
  probabilities and the "this looks like that" picture of `protopool_hf.explain`: where each slot fired, the
  prototype's source patch, similarity × weight = contribution, summing to the logit. Choosing another class shows
  why *not* that class.
- **Prototypes**: the gallery; selecting one shows its source image with the box, the classes and slots that use it,
  and its nearest training patches when the folder has them.
- **Classes**: each class's slots and their prototypes.
- **Report**: the folder's interpretability report and metrics, or how to compute them.

The API endpoint `/explain` takes an image and returns the class probabilities (`{label: probability}`, most probable
first) and the explanation picture:

```python
from gradio_client import Client, handle_file

probabilities, picture_path = Client("http://127.0.0.1:7860/").predict(handle_file("photo.jpg"), api_name="/explain")
```

Needs the `app` extra (`pip install protopool-hf[app]`); `import protopool_hf` never imports gradio. From the command
line: `protopool-hf app MODEL [--port 7860] [--host 127.0.0.1]`.
"""

import math
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image

from .explorer import BadImageError, Explorer, flatten_report, read_upload


__all__ = ["build_app", "launch"]

_PREDICTED = -1  # the class dropdown's "predicted class" choice
_TABLE_ROWS = 20
_API_TOP_K = 5  # classes listed in the picture of /explain (its probabilities cover every class)
_NOT_PROJECTED = (
    "**This model was never projected**: its prototypes are learned vectors, not patches of training images, so the "
    "pictures show a note where a prototype's source patch would be. Run `protopool-hf project` on the training "
    "data to give every prototype its source."
)


def _image_upload() -> gr.Image:
    """The image input, whose unreadable uploads become a clear message in the page (not a bare "Error").

    Gradio opens the upload with PIL before our function runs, so its preprocessing is wrapped on this one instance (a
    `gr.Image` subclass would do too, but gradio writes a `.pyi` stub next to any module defining a component class).
    """
    image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"], elem_id="image")
    preprocess = image.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except Exception as error:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(
                f"Cannot read {name!r} as an image: it is no image file, or a truncated one ({type(error).__name__}). "
                "Upload a complete PNG, JPEG or WebP picture.",
                title="Not an image",
            ) from error

    image.preprocess = checked
    return image


def build_app(model_or_path: Any, *, title: str | None = None) -> gr.Blocks:
    """The explorer of a ProtoPool model.

    Args:
        model_or_path: a `ProtoPoolForImageClassification`, a model folder, or a Hub repo id (downloaded with its
            `prototypes/` pictures, `examples/` and reports).
        title: the page title (default: "ProtoPool explorer: <model>").

    Returns:
        The app; `app.launch()` serves it.
    """
    explorer = Explorer.load(model_or_path)
    if explorer.folder is not None:  # served as they are: the pictures and examples (not the weights)
        gr.set_static_paths([p for p in (explorer.folder / "prototypes", explorer.folder / "examples") if p.is_dir()])
    title = title or f"ProtoPool explorer: {explorer.name}"
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\n{_model_line(explorer)}")
        if not explorer.projected:
            gr.Markdown(_NOT_PROJECTED, elem_id="not-projected")
        with gr.Tabs():
            with gr.Tab("Explain", id="explain"):
                _explain_tab(explorer)
            with gr.Tab("Prototypes", id="prototypes"):
                _prototypes_tab(explorer)
            with gr.Tab("Classes", id="classes"):
                _classes_tab(explorer)
            with gr.Tab("Report", id="report"):
                _report_tab(explorer)
    return app


def launch(model_or_path: Any, *, host: str = "127.0.0.1", port: int = 7860, **launch_kwargs: Any) -> Any:
    """Build the explorer and serve it on `host:port` (blocks until interrupted unless `prevent_thread_lock=True`)."""
    return build_app(model_or_path).launch(server_name=host, server_port=port, **launch_kwargs)


def _model_line(explorer: Explorer) -> str:
    config = explorer.config
    return (
        f"{config.num_labels} classes × {config.num_slots_per_class} slots over a pool of {config.num_prototypes} "
        f"prototypes, backbone `{config.backbone}`, input {config.input_size[-1]}×{config.input_size[-2]} px."
    )


# --------------------------------------------------------------------------- Explain
def _explain_tab(explorer: Explorer) -> None:
    num_classes = explorer.config.num_labels
    with gr.Row():
        with gr.Column(scale=1):
            image = _image_upload()
            examples = None
            if explorer.examples:
                examples = gr.Examples(
                    [[str(p)] for p in explorer.examples], inputs=[image], label="Examples", elem_id="examples"
                )
            choices = [("the predicted class", _PREDICTED)] + [(name, c) for c, name in enumerate(explorer.labels)]
            class_choice = gr.Dropdown(choices, value=_PREDICTED, label="Explain which class (another: why not?)")
            top_k = gr.Slider(1, min(num_classes, 20), value=min(num_classes, 5), step=1, label="Classes to list")
            button = gr.Button("Explain", variant="primary")
        with gr.Column(scale=1):
            probabilities = gr.Label(label="Top classes", num_top_classes=min(num_classes, 5), elem_id="top-classes")
            summary = gr.Markdown(elem_id="summary")
    picture = gr.Image(
        label="This looks like that", type="pil", format="png", elem_id="explanation", interactive=False
    )
    table = gr.Dataframe(
        headers=["class", "slot", "prototype", "similarity", "× weight", "= contribution"],
        label="Slot contributions (largest first)",
        interactive=False,
    )

    def page(path: str | None, class_id: int | None, k: float) -> tuple[Any, ...]:
        if path is None:
            return gr.update(value=None), "", None, None
        chosen = None if class_id in (None, _PREDICTED) else int(class_id)
        try:
            result = explorer.explain(read_upload(path), chosen, int(k))
        except BadImageError as error:
            raise gr.Error(str(error), title="Cannot explain this image") from error
        rows = [
            [r.owner, r.slot, r.prototype_id, round(r.similarity, 4), round(r.weight, 4), round(r.contribution, 4)]
            for r in result.rows[:_TABLE_ROWS]
        ]
        text = result.summary
        rest = result.rows[_TABLE_ROWS:]
        if rest:
            text += f" The table lists the top {_TABLE_ROWS}; {len(rest)} more add {sum(r.contribution for r in rest):.3f}."
        return gr.update(value=result.probabilities, num_top_classes=int(k)), text, result.picture, rows

    inputs, outputs = [image, class_choice, top_k], [probabilities, summary, picture, table]
    # An upload, an example, another class or count, the button: explain (`image.change` would fire twice per upload).
    for event in (image.upload, class_choice.change, top_k.release, button.click):
        event(page, inputs, outputs, api_visibility="private")
    image.clear(lambda: (None, "", None, None), None, outputs, api_visibility="private")
    if examples is not None:
        examples.load_input_event.then(page, inputs, outputs, api_visibility="private")

    # The API: image -> ({label: probability}, picture), for gradio_client and scripts.
    def api(path: str | None) -> tuple[dict[str, float], Any]:
        try:
            result = explorer.explain(read_upload(path), None, _API_TOP_K)  # the picture lists 5; the dict all
        except BadImageError as error:
            raise gr.Error(str(error), title="Cannot explain this image") from error
        return result.probabilities, result.picture

    api_probabilities = gr.JSON(visible=False)
    api_picture = gr.Image(type="pil", format="png", visible=False)
    gr.Button(visible=False).click(api, [image], [api_probabilities, api_picture], api_name="explain")


# --------------------------------------------------------------------------- Prototypes
def _prototypes_tab(explorer: Explorer) -> None:
    used = sorted({p for row in explorer.slots for p in row})
    shown = [p for p in used if explorer.picture(p) is not None]
    gr.Markdown(
        f"{len(used)} of {explorer.config.num_prototypes} prototypes are used by class slots. "
        + ("Click a prototype to see its source and the classes that use it." if shown else _no_pictures(explorer))
    )
    gallery = gr.Gallery(
        [(str(explorer.picture(p)), f"prototype {p}") for p in shown],
        label="Prototypes",
        columns=8,
        height=min(720, 60 + 180 * math.ceil(len(shown) / 8)),
        object_fit="contain",
        allow_preview=False,
        visible=bool(shown),
        elem_id="prototype-gallery",
    )
    choices = [(explorer.prototype_label(p), p) for p in range(explorer.config.num_prototypes)]
    first = used[0] if used else 0
    picture, text, patches = _prototype_detail(explorer, first)
    chosen = gr.Dropdown(choices, value=first, label="Prototype", elem_id="prototype-choice")
    with gr.Row():
        source = gr.Image(picture, label="Source image and box", type="pil", interactive=False, height=320)
        details = gr.Markdown(text, elem_id="prototype-details")
    nearest = gr.Gallery(
        patches,
        label="Nearest training patches",
        columns=6,
        height=260,
        object_fit="contain",
        allow_preview=False,
        visible=bool(patches),
    )

    def show(prototype_id: int) -> tuple[Any, ...]:
        picture, text, patches = _prototype_detail(explorer, int(prototype_id))
        return picture, text, gr.update(value=patches, visible=bool(patches))

    def select(event: gr.SelectData) -> int:
        return shown[event.index]

    gallery.select(select, None, chosen, api_visibility="private")
    chosen.change(show, chosen, [source, details, nearest], api_visibility="private")


def _prototype_detail(
    explorer: Explorer, p: int
) -> tuple[PIL.Image.Image | None, str, list[tuple[PIL.Image.Image, str]]]:
    """The source picture, the text (provenance, classes and slots) and the nearest patches of prototype `p`."""
    picture = explorer.picture(p, "source") or explorer.picture(p, "overlay") or explorer.picture(p)
    uses = explorer.prototype_uses(p)
    lines = [f"### Prototype {p}", explorer.provenance(p), ""]
    if uses:
        lines += ["| class | slot | weight |", "|---|---|---|"]
        lines += [f"| {explorer.labels[c]} | {s} | {w:+.3f} |" for c, s, w in uses]
    else:
        lines.append("No class slot uses this prototype.")
    patches = [(_read(path), f"nearest {rank}") for rank, path in enumerate(explorer.nearest(p), start=1)]
    if not patches:
        lines.append(
            "\nThe model folder has no nearest training patches of it "
            "(`protopool_hf.explorer.save_nearest_patches` writes them)."
        )
    return (_read(picture) if picture else None), "\n".join(lines), patches


def _read(path: Path) -> PIL.Image.Image:
    """A picture of the model folder, in memory.

    Events return images, not paths: after launch, gradio serves a returned path only from the working directory, the
    temporary directory or its static paths, and a Hub snapshot's files are symlinks into the cache's blob store,
    which none of these covers (on a Space the cache is in the home directory).
    """
    with PIL.Image.open(path) as image:
        return image.convert("RGB")


def _no_pictures(explorer: Explorer) -> str:
    if not explorer.projected:
        return "The model was never projected, so its prototypes have no pictures; the list below still shows which classes use each one."
    return "The model folder has no prototype pictures (`prototypes/`): `protopool-hf project` draws them."


# --------------------------------------------------------------------------- Classes
def _classes_tab(explorer: Explorer) -> None:
    choices = [(name, c) for c, name in enumerate(explorer.labels)]
    tiles, text = _class_detail(explorer, 0)
    chosen = gr.Dropdown(choices, value=0, label="Class", elem_id="class-choice")
    rows = math.ceil(explorer.config.num_slots_per_class / 6)
    slots = gr.Gallery(
        tiles,
        label="Slots",
        columns=6,
        height=60 + 200 * rows,
        object_fit="contain",
        allow_preview=False,
        visible=bool(tiles),
    )
    details = gr.Markdown(text, elem_id="class-details")

    def show(class_id: int) -> tuple[Any, ...]:
        tiles, text = _class_detail(explorer, int(class_id))
        return gr.update(value=tiles, visible=bool(tiles)), text

    chosen.change(show, chosen, [slots, details], api_visibility="private")


def _class_detail(explorer: Explorer, c: int) -> tuple[list[tuple[PIL.Image.Image, str]], str]:
    """A class's slot pictures (`(path, caption)`) and its table: slot, prototype, weight, other classes using it."""
    weights = explorer.model.head.last_layer.weight.detach().float().cpu()
    num_slots = explorer.config.num_slots_per_class
    tiles, lines = (
        [],
        [f"### {explorer.labels[c]}", "", "| slot | prototype | weight | also used by |", "|---|---|---|---|"],
    )
    for s, p in enumerate(explorer.slots[c]):
        weight = float(weights[c, c * num_slots + s])
        others = sorted({explorer.labels[o] for o, _, _ in explorer.prototype_uses(p) if o != c})
        lines.append(f"| {s} | {p} | {weight:+.3f} | {', '.join(others) or '-'} |")
        picture = explorer.picture(p)
        if picture is not None:
            tiles.append((_read(picture), f"slot {s}: prototype {p} ({weight:+.2f})"))
    if not tiles:
        lines.append("\n" + _no_pictures(explorer))
    return tiles, "\n".join(lines)


# --------------------------------------------------------------------------- Report
def _report_tab(explorer: Explorer) -> None:
    report, metrics = explorer.reports()
    parts = []
    if metrics:
        parts += ["### Metrics", "", "| metric | value |", "|---|---|"]
        parts += [
            f"| {k} | {v} |" for k, v in flatten_report(metrics) if k != "settings" and not k.startswith("settings.")
        ]
    if report is not None:
        parts += ["", "### Interpretability (interpretability.json)", "", "| measure | value |", "|---|---|"]
        parts += [f"| {k} | {v} |" for k, v in flatten_report(report) if not k.startswith("settings.")]
    if not parts:
        parts.append(
            "The model folder has no metrics and no interpretability report. Compute them with "
            "`protopool-hf evaluate MODEL ...`, which writes `interpretability.json` next to the model."
        )
    elif report is None:
        parts.append(
            "\nNo interpretability report (`interpretability.json`) in the model folder: "
            "`protopool-hf evaluate MODEL ...` computes it."
        )
    gr.Markdown("\n".join(parts), elem_id="report")
    if report is not None:
        gr.JSON(report, label="interpretability.json")
