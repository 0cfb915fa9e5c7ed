"""Run the tiny ProtoPool recipe on 2 CPU processes and check that the replicas stay equal.

Started by tests/test_training.py::test_two_process_ddp_recipe_keeps_replicas_equal:

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_recipe.py OUTPUT_DIR

Every rank writes OUTPUT_DIR/rank<k>.json: the replica checks made inside the run (all ranks gather every parameter
and buffer and compare them) when the joint phase starts and after its first step (right after the warm-up -> joint
switch), at the end of every phase (inside `train`, where DDP leaves each rank its own BatchNorm statistics, so
only the parameters must agree) and after the whole recipe; whether the backbone moved in each phase and whether
its stem did (`frozen_backbone_stages=1` keeps it fixed); a checksum of the final weights. The ranks start from differently initialised models: DDP's first wrap makes them equal.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback


sys.path.insert(0, str(Path(__file__).parent))
from protopool_tiny import fashion_config, fashion_mnist, fashion_model

from protopool_hf.backbone import leading_stage_parameters
from protopool_hf.recipe import ProtoPoolRecipe
from protopool_hf.training import finish_distributed, train_protopool


def flat_state(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten().nan_to_num(-7.0) for t in model.state_dict().values()])


class ReplicaCheck(TrainerCallback):
    """Gathers the whole model from every rank and compares: at the first joint step and at each phase's end."""

    def __init__(self) -> None:
        self.checks: list[dict] = []
        self.backbone_moved: dict[str, bool] = {}
        self.stem_moved: dict[str, bool] = {}
        self._backbone_start: torch.Tensor | None = None
        self._stem_start: torch.Tensor | None = None

    def _compare(self, where: str, model: torch.nn.Module) -> None:
        state = model.state_dict()
        params = {name for name, _ in model.named_parameters()}
        differ = []
        for name, tensor in state.items():
            mine = tensor.detach().double().flatten().nan_to_num(-7.0)
            gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, mine)
            if any(not torch.equal(g, gathered[0]) for g in gathered):
                differ.append(name)
        self.checks.append(
            {
                "where": where,
                "equal": not differ,
                "parameters_equal": not (set(differ) & params),
                "differing": differ[:10],
            }
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if Path(args.output_dir).name == "joint":  # after the new Trainer has wrapped the model for the joint phase
            self._compare("joint:start", model)
        self._backbone_start = torch.cat([p.detach().flatten().clone() for p in model.backbone.parameters()])
        self._stem_start = stem(model).clone()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if Path(args.output_dir).name == "joint" and state.global_step == 1:
            self._compare("joint:first_step", model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        phase = Path(args.output_dir).name
        self._compare(f"{phase}:end", model)
        backbone = torch.cat([p.detach().flatten() for p in model.backbone.parameters()])
        self.backbone_moved[phase] = not torch.equal(backbone, self._backbone_start)
        self.stem_moved[phase] = not torch.equal(stem(model), self._stem_start)


def stem(model: torch.nn.Module) -> torch.Tensor:
    """The backbone's stem (frozen by `frozen_backbone_stages=1`), flattened."""
    names = set(leading_stage_parameters(model.backbone, 1))
    return torch.cat([p.detach().flatten() for n, p in model.backbone.named_parameters() if n in names])


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    config = fashion_config()
    train, val, plain = fashion_mnist(config, n_train=32, n_val=16)
    recipe = ProtoPoolRecipe(
        output_dir=str(out / "run"),
        warmup_epochs=1,
        joint_epochs=2,
        finetune_epochs=1,
        train_batch_size=8,
        eval_batch_size=8,
        projection_batch_size=8,
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        frozen_backbone_stages=1,
    )
    check = ReplicaCheck()
    result = train_protopool(fashion_model(seed=dist.get_rank() if dist.is_initialized() else 0), train, val, plain,
                             recipe, callbacks=[check])  # fmt: skip
    check._compare("recipe:end", result.model)
    rank, world = dist.get_rank(), dist.get_world_size()
    final = flat_state(result.model)
    report = {
        "rank": rank,
        "world_size": world,
        "checks": check.checks,
        "backbone_moved_in_warmup": check.backbone_moved.get("warmup"),
        "backbone_moved_in_joint": check.backbone_moved.get("joint"),
        "stem_moved_in_joint": check.stem_moved.get("joint"),
        "final_checksum": hashlib.sha256(final.numpy().tobytes()).hexdigest(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=2))
    finish_distributed()


if __name__ == "__main__":
    main()
