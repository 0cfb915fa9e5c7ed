"""Deployment: a branch-free head (torch.compile, torch.export), ONNX export with explanations, a torch-free
explainer, bf16 / fp16 loading."""

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import protopool_tiny
import pytest
import timm
import torch
from photo_fixtures import PHOTOS, give_provenance, photo_dataset, photo_model

import protopool_hf
from protopool_hf import ProtoPoolForImageClassification
from protopool_hf.cli import main as cli_main
from protopool_hf.explanation import explain
from protopool_hf.export import OUTPUT_NAMES, check_onnx, export_onnx
from protopool_hf.gallery import save_prototype_images
from protopool_hf.maps import preprocess


ROOT = Path(__file__).resolve().parents[1]
EXPLAINER = ROOT / "examples" / "onnx_explain.py"
ATOL = 1e-4  # onnxruntime vs PyTorch, absolute, on logits and similarities (the bound)


def tiny(backbone: str = "test_resnet", size: int = 64, seed: int = 0, **kwargs) -> ProtoPoolForImageClassification:
    model = protopool_tiny.tiny_model(seed, backbone=backbone, input_size=[3, size, size], **kwargs).eval()
    model.set_gumbel_scale(7.0)  # a soft assignment that is neither uniform nor one-hot
    return model


def load_explainer():
    spec = importlib.util.spec_from_file_location("onnx_explain", EXPLAINER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- 1. branch-free head


def test_assignment_soft_and_hard_paths_are_exact():
    model = tiny()
    head = model.head
    model.set_gumbel_scale(1.0)
    # s = 1, eval: bit-for-bit the official plain softmax over the pool.
    assert torch.equal(head.assignment(), torch.softmax(head.slot_logits, dim=1))
    model.harden_assignment()
    hard = torch.nn.functional.one_hot(head.slot_logits.argmax(1), 6).permute(0, 2, 1).float()
    assert torch.equal(head.assignment(), hard)
    head.train()
    assert torch.equal(head.assignment(), hard)  # training mode too
    head.slot_logits.grad = None
    head(torch.randn(2, head.add_on[0].in_channels, 3, 3)).logits.sum().backward()
    assert torch.count_nonzero(head.slot_logits.grad) == 0  # hardened: the logits are kept, not trained


def test_compile_fullgraph_has_no_graph_break():
    """`fullgraph=True` raises on any graph break; the eager backend checks tracing without inductor's C++ build.

    Hardening flips a buffer the graph reads: the same compiled graph serves both states, no recompilation.
    """
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=0, atol=0)
        model.harden_assignment()
        hard = compiled(x)
        torch.testing.assert_close(hard.logits, model(x).logits, rtol=0, atol=0)
    assert set(hard.slot_assignment.unique().tolist()) == {0.0, 1.0}


@pytest.mark.slow
def test_compile_fullgraph_with_labels():
    """The training forward with labels (loss terms and the labels' range check) compiles without a graph break."""
    model = tiny().train()
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.manual_seed(0)
    loss = compiled(x, labels=labels).loss
    torch.manual_seed(0)
    torch.testing.assert_close(loss, model(x, labels=labels).loss)
    # The range check is an assertion op in the graph: a bad label still fails, naming the range.
    with pytest.raises(RuntimeError, match=r"outside \[0, 3\)"):
        compiled(x, labels=torch.tensor([0, 3]))


@pytest.mark.slow
def test_compile_with_inductor_matches_eager():
    """The real compiler (inductor's C++ build: 20-60 s on 2 cores) on the eval forward, with fullgraph=True."""
    model = tiny()
    x = torch.randn(3, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    # Inductor fuses and reorders float32 sums: compare at float32 rounding of the logits' scale.
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.similarities, want.similarities, rtol=1e-4, atol=1e-4)


def test_torch_export_follows_the_hard_assignment_buffer():
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    exported = program.module()
    torch.testing.assert_close(exported(x).logits, model(x).logits, rtol=0, atol=1e-6)
    # The flag is a buffer read by the graph, not a constant baked in at export time.
    model.harden_assignment()
    program = torch.export.export(model, (x,))
    assert torch.equal(program.module()(x).slot_assignment, model(x).slot_assignment)
    assert set(program.module()(x).slot_assignment.unique().tolist()) == {0.0, 1.0}


# --------------------------------------------------------------------------- 2. ONNX export


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A projected model folder with prototype pictures, and its ONNX file (exported once for the module)."""
    folder = tmp_path_factory.mktemp("model")
    dataset = photo_dataset()
    model = photo_model()
    give_provenance(model, dataset)
    model.save_pretrained(folder)
    save_prototype_images(model, dataset, folder)
    path = protopool_hf.export_onnx(model, folder.parent / "model.onnx")
    return model, folder, path


def test_onnx_outputs_names_shapes_and_values(explained):
    import onnxruntime

    model, _, path = explained
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    pixels = torch.cat([preprocess(p, model.config) for p in PHOTOS])  # 4 photos: another batch size than export's
    got = dict(zip(OUTPUT_NAMES, session.run(None, {"pixel_values": pixels.numpy()}), strict=True))
    assert got["logits"].shape == (4, 4) and got["similarities"].shape == (4, 4, 2)
    assert got["min_distances"].shape == (4, 8) and got["activations"].shape == (4, 8, 5, 5)
    with torch.no_grad():
        out = model.head(model.forward_features(pixels))
        phi = protopool_hf.layers.log_similarity(out.distances, model.config.similarity_epsilon)
        mixed_min = torch.einsum("np,cps->ncs", out.min_distances, out.slot_assignment).numpy()
    # Tolerance from float32 error: a distance is a sum of 2·D terms in [0, 1] (latent and prototype entries), so it
    # carries ~8·2D·eps32 of rounding, and φ(d) = log((d + 1) / (d + ε)) multiplies that by |φ'(d)| ≈ 1 / (d + ε).
    # Far from 0 this is below ATOL; on a prototype's own projection image (d ≈ 0) it reaches ~1e-2.
    rounding = 8 * 2 * model.config.prototype_dim * np.finfo(np.float32).eps
    eps = model.config.similarity_epsilon
    slot_tol = ATOL + rounding / (mixed_min + eps)  # (N, C, S)
    logit_tol = ATOL + slot_tol.reshape(4, -1) @ np.abs(model.head.last_layer.weight.detach().numpy()).T
    assert np.all(np.abs(got["similarities"] - out.similarities.numpy()) <= slot_tol)
    assert np.all(np.abs(got["logits"] - out.logits.numpy()) <= logit_tol)
    assert np.all(np.abs(got["min_distances"] - out.min_distances.numpy()) <= rounding)
    assert np.all(np.abs(got["activations"] - phi.numpy()) <= ATOL + rounding / (out.distances.numpy() + eps))
    # The activation maps are the explanation: the projected prototype fires hardest where it was projected.
    image, row, col = model.head.projection_image_index, model.head.projection_row, model.head.projection_col
    for p in range(8):
        grid = got["activations"][image[p], p]
        assert np.unravel_index(grid.argmax(), grid.shape) == (row[p], col[p])


def test_onnx_metadata_props(explained):
    import onnxruntime

    model, folder, path = explained
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = load_explainer().read_metadata(session, path)
    assert meta["id2label"] == ["bull mastiff", "strawberry", "drum", "bald eagle"]
    assert meta["preprocessor_config"] == json.loads((folder / "preprocessor_config.json").read_text())
    assert meta["slot_prototypes"] == model.class_to_prototypes().tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert meta["hard_assignment"] is True
    np.testing.assert_array_equal(meta["last_layer_weight"], model.head.last_layer.weight.detach().numpy())
    assert meta["prototype_labels"] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert meta["config"]["num_prototypes"] == 8


def test_onnx_soft_assignment_and_fixed_batch(tmp_path):
    model = tiny()
    path = export_onnx(model, tmp_path / "soft.onnx", dynamic_batch=False)
    check = check_onnx(model, path, torch.randn(1, 3, 64, 64))
    assert check.within(ATOL), check.max_abs_diff
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 64]
    assert not model.training  # the mode is put back
    model.train()
    export_onnx(model, tmp_path / "soft.onnx", overwrite=True)
    assert model.training


def test_export_refuses_bad_input_before_any_work(tmp_path):
    model = tiny()
    (tmp_path / "taken.onnx").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(model, tmp_path / "taken.onnx")
    assert (tmp_path / "taken.onnx").read_bytes() == b"keep"
    with pytest.raises(ValueError, match=r"end in \.onnx"):
        export_onnx(model, tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "model.onnx")
    with pytest.raises(ValueError, match=r"model\.float\(\)"):
        export_onnx(tiny().to(torch.bfloat16), tmp_path / "bf16.onnx")
    with pytest.raises(ValueError, match="ProtoPoolForImageClassification"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "linear.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]  # nothing half-written


def test_cli_export(explained, tmp_path, capsys):
    model, folder, _ = explained
    out = tmp_path / "cli.onnx"
    assert cli_main(["export", str(folder), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "logits" in printed and str(out) in printed
    assert check_onnx(model, out).within(ATOL)
    assert cli_main(["export", str(folder), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _onnx_sweep_backbones() -> list[str]:
    return timm.list_models("test_*")


# Backbones torch cannot export to ONNX today, with the reason (kept in step with docs/export.md).
ONNX_FAILURES: dict[str, str] = {}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", _onnx_sweep_backbones())
def test_onnx_matches_pytorch_on_every_test_backbone(backbone, tmp_path):
    if backbone in ONNX_FAILURES:
        pytest.xfail(ONNX_FAILURES[backbone])
    model = tiny(backbone, size=160)
    path = export_onnx(model, tmp_path / "model.onnx")
    check = check_onnx(model, path, torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(1)))
    assert check.within(ATOL), check.max_abs_diff


def test_onnx_matches_pytorch_on_a_vit(tmp_path):
    """A token backbone (prefix tokens dropped, patch grid reshaped) besides the CNNs, in the default suite."""
    model = tiny("test_vit", size=64)
    path = export_onnx(model, tmp_path / "vit.onnx")
    check = check_onnx(model, path, torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    assert check.within(ATOL), check.max_abs_diff


def test_package_exports_export_onnx():
    assert "export_onnx" in protopool_hf.__all__
    assert protopool_hf.export_onnx is export_onnx


# --------------------------------------------------------------------------- 3. explanation without torch


def test_onnx_explain_runs_without_torch(explained, tmp_path):
    _, folder, path = explained
    out = tmp_path / "explanation.png"
    # A meta-path finder refuses torch: any attempt to import it fails the script; afterwards sys.modules is checked.
    wrapper = (
        "import runpy, sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch imported')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        f"sys.argv = [{str(EXPLAINER)!r}] + sys.argv[1:]\n"
        "try:\n"
        f"    runpy.run_path({str(EXPLAINER)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch in sys.modules'\n"
    )
    args = [str(path), str(PHOTOS[3]), "--model-dir", str(folder), "--out", str(out), "--json"]
    done = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    result = json.loads(lines[1])
    assert result["top_classes"][0][1] == "bald eagle"
    assert {s["prototype_id"] for s in result["slots"][:2]} == {3, 7}
    # Every slot's contribution adds up to the logit, as in the library's explain().
    total = sum(s["contribution"] for s in result["slots"])
    assert total == pytest.approx(result["logit"], abs=1e-5)
    reference = explain(explained[0], PHOTOS[3])
    assert [s["prototype_id"] for s in result["slots"]] == [s.prototype_id for s in reference.slots]
    picture = PIL.Image.open(out)
    assert picture.width > 600 and picture.height > 400
    assert np.asarray(picture).std() > 20  # a drawn picture, not a blank canvas


@pytest.mark.parametrize(
    ("size", "preprocessing"),
    [((512, 512), {}), ((333, 500), {}), ((500, 333), {}), ((301, 219), {"crop_mode": "squash", "crop_pct": 1.0})],
)
def test_numpy_preprocessing_matches_the_library(size, preprocessing, tiny_model):
    from transformers import AutoImageProcessor

    explainer = load_explainer()
    model = tiny_model(**preprocessing)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        processor_config = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        stock = AutoImageProcessor.from_pretrained(folder, backend="pil")
    with PIL.Image.open(PHOTOS[0]) as photo:
        image = photo.convert("RGB").resize(size)
    ours, view = explainer.preprocess(image, processor_config)
    # The stock transformers processor the folder names: the same operations, in the same order.
    np.testing.assert_array_equal(ours, stock(images=image, return_tensors="np")["pixel_values"])
    # The library's own eval preprocessing (timm's transform): within a grey level, where crop offsets agree.
    library = preprocess(image, model.config).numpy()
    assert ours.shape == library.shape == (1, 3, 160, 160)
    grey_level = 1 / 255 / min(model.config.image_std)
    assert np.abs(ours - library).mean() < 0.5 * grey_level
    assert view.size == (160, 160)


# --------------------------------------------------------------------------- 4. bf16 / fp16


def test_bf16_and_fp16_loading_keeps_the_head_in_float32(tmp_path):
    from transformers import AutoModelForImageClassification

    model = tiny(size=64)
    model.set_gumbel_scale(577.35)
    model.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x).logits
    for dtype in (torch.bfloat16, torch.float16):
        loaded = AutoModelForImageClassification.from_pretrained(tmp_path, dtype=dtype).eval()
        assert next(loaded.backbone.parameters()).dtype == dtype
        head = loaded.head
        assert {p.dtype for p in head.parameters()} == {torch.float32}
        assert head.gumbel_scale.dtype == torch.float32 and head.gumbel_scale.item() == pytest.approx(577.35)
        assert head.hard_assignment.dtype == torch.bool and head.projection_row.dtype == torch.long
        with torch.no_grad():
            out = loaded(x.to(dtype))
        assert out.logits.dtype == out.min_distances.dtype == torch.float32
        # The bound; this random model's logits are small (|logit| < 0.1), so see the test below too.
        torch.testing.assert_close(out.logits, reference, rtol=0, atol=1e-2)
    # A float32 model cast afterwards (`.to(bf16)`) runs too: the head casts its weights to float32 itself.
    cast = tiny(size=64).to(torch.bfloat16)
    assert cast(x.bfloat16()).logits.dtype == torch.float32


def test_bf16_logits_of_a_trained_scale_model_through_pipeline(explained):
    """Logits of O(10) (prototypes on real patches): the error is bf16's rounding, relative to the logits' scale.

    The backbone's activations carry bf16's unit roundoff u = 2⁻⁸ (fp16: 2⁻¹¹); the float32 head passes that on to
    the logits about proportionally (measured: 1.1·u·max|logit| for bf16 on these photos, 0.5·u·max|logit| for fp16),
    so an absolute 1e-2 holds only for |logit| below ~2.5. The bound here is 4·u·max|logit|.
    """
    from transformers import AutoModelForImageClassification, pipeline

    model, folder, _ = explained
    pixels = torch.cat([preprocess(p, model.config) for p in PHOTOS])
    with torch.no_grad():
        reference = model(pixels).logits
    scale = float(reference.abs().max())
    for dtype, unit in ((torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)):
        loaded = AutoModelForImageClassification.from_pretrained(folder, dtype=dtype).eval()
        with torch.no_grad():
            logits = loaded(pixels.to(dtype)).logits
        assert float((logits - reference).abs().max()) <= 4 * unit * scale
        assert torch.equal(logits.argmax(1), reference.argmax(1))
    # Through the stock pipeline: raw logits (function_to_apply="none"), float32 against bf16.
    image = PIL.Image.open(PHOTOS[3]).convert("RGB")
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        classify = pipeline("image-classification", model=str(folder), dtype=dtype)
        assert classify.model.dtype == dtype and classify.model.head.prototypes.dtype == torch.float32
        scores[dtype] = {r["label"]: r["score"] for r in classify(image, function_to_apply="none", top_k=4)}
    assert next(iter(scores[torch.bfloat16])) == next(iter(scores[torch.float32])) == "bald eagle"
    for label, value in scores[torch.float32].items():
        assert scores[torch.bfloat16][label] == pytest.approx(value, abs=4 * 2.0**-8 * scale)
