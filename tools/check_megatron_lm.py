"""Check megatron-prune inside the real Megatron-LM ``pretrain_gpt.py`` (docs/megatron_lm.md).

Given a checkout of Megatron-LM at a supported tag (core_v0.16.1 matches megatron-core 0.16.1),
this makes a teacher with ``convert``, a pruned student with ``score`` + ``prune`` and a
keep-everything student, applies the documented lines to a copy of the checkout's
``pretrain_gpt.py`` (each must find its place, or the docs are out of date) and runs it under
torchrun through tools/megatron_lm_cpu.py (without a GPU, that patches what Megatron-LM's loop
needs to run on the CPU; with one, nothing). It checks:

* the documented lines run in the real ``pretrain()``: the student distils (KL is logged);
* ``--load STUDENT --finetune`` starts from the pruned model: the student's logits on the first
  micro-batch equal megatron-prune's own forward pass of the checkpoint, and a keep-everything
  student starts at KL ~ 0, far below a random student's first KL;
* ``--save`` output converts back with ``megatron-prune convert``: Megatron-LM loading its own
  save gives the same logits as megatron-prune's forward pass of the converted checkpoint.

The copy uses the installed megatron-core (the checkout's own megatron/core is left out, so the
check is of this environment's megatron-core). Megatron-LM's training code also needs ``six``,
``pydantic`` and ``triton`` (``pip install -r requirements-megatron-lm.txt``).

usage: python tools/check_megatron_lm.py --megatron-lm DIR [--source SRC] [--tp N] [--pp N]
           [--vpp N] [--workdir DIR] [--out report.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent

# The documented changes to pretrain_gpt.py (docs/megatron_lm.md, "The lines to add"), as
# (line in Megatron-LM's script, what the docs put there). tests/test_megatron_lm_training.py checks
# that the docs show every replacement; this tool checks that the script has every original.
DOCUMENTED_EDITS = (
    ("from model_provider import model_provider\n",
     "from model_provider import model_provider\n"
     "from megatron_prune import megatron_lm as kd\n"),
    ("        partial(model_provider, gpt_builder),\n",
     "        kd.distillation_model_provider(partial(model_provider, gpt_builder)),\n"),
    ("        forward_step,\n        args_defaults=",
     "        kd.forward_step,\n        args_defaults="),
    ("        extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,\n",
     "        extra_args_provider=partial(\n"
     "            kd.add_distillation_args,"
     " also=add_modelopt_args if has_nvidia_modelopt else None),\n"),
)  # fmt: skip

# What Megatron-LM's training code is copied with: everything but megatron/core.
TRAINING_CODE = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py", "megatron/training",
                 "megatron/legacy", "megatron/post_training", "megatron/rl")  # fmt: skip
NEEDED_MODULES = ("six", "pydantic", "triton")

SEQ_LEN = 32
MICRO_BATCH, GLOBAL_BATCH = 2, 4


def fail(message: str) -> None:
    print(f"check_megatron_lm: {message}", file=sys.stderr)
    raise SystemExit(2)


def preflight(checkout: Path) -> None:
    """One line naming what is missing, before any work."""
    for part in TRAINING_CODE[:1] + ("megatron/training",):
        if not (checkout / part).exists():
            fail(f"{checkout} has no {part}: pass a Megatron-LM checkout (NVIDIA/Megatron-LM, "
                 "tag core_v0.16.1)")  # fmt: skip
    missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"Megatron-LM's training code needs {', '.join(missing)}: "
             "pip install -r requirements-megatron-lm.txt")  # fmt: skip
    info = checkout / "megatron/core/package_info.py"
    if info.exists():
        from megatron.core import package_info

        text = info.read_text()
        major = re.search(r"MAJOR\s*=\s*(\d+)", text)
        minor = re.search(r"MINOR\s*=\s*(\d+)", text)
        if major and minor and (int(major[1]), int(minor[1])) != (
            package_info.MAJOR, package_info.MINOR
        ):
            fail(f"the checkout is Megatron-LM core {major[1]}.{minor[1]}, the installed "
                 f"megatron-core {package_info.__version__}: check out the matching tag")


def apply_documented_edits(script: str) -> str:
    for original, replacement in DOCUMENTED_EDITS:
        if script.count(original) != 1:
            fail(f"pretrain_gpt.py does not contain {original.strip()!r} exactly once: "
                 "docs/megatron_lm.md no longer matches this Megatron-LM version")  # fmt: skip
        script = script.replace(original, replacement)
    return script


def copy_training_code(checkout: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for part in TRAINING_CODE:
        src = checkout / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / part)
    script = dest / "pretrain_gpt_kd.py"
    script.write_text(apply_documented_edits((checkout / "pretrain_gpt.py").read_text()))
    return script


def make_models(source: str, work: Path) -> dict[str, Path]:
    """Teacher (convert), scores, a pruned student (3/4 of hidden and FFN widths) and a
    keep-everything student (the teacher's own widths), all at TP=1."""
    from megatron_prune import api
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.data.corpus import cache_dir, write_splits

    calibration = write_splits(cache_dir() / "text")[0]
    paths = {name: work / name for name in ("teacher", "scores", "student", "keep_all")}
    api.convert(source, paths["teacher"])
    arch = CheckpointMeta.read(paths["teacher"]).arch
    api.score(paths["teacher"], calibration, paths["scores"], samples=8, seq_len=SEQ_LEN)
    shrink = {"hidden_size": arch.hidden_size * 3 // 4 // 16 * 16,
              "ffn_hidden_size": arch.ffn_hidden_size * 3 // 4 // 16 * 16}  # fmt: skip
    api.prune(paths["teacher"], paths["scores"], shrink, paths["student"])
    keep = {"hidden_size": arch.hidden_size, "ffn_hidden_size": arch.ffn_hidden_size}
    api.prune(paths["teacher"], paths["scores"], keep, paths["keep_all"])
    return paths


def megatron_lm_command(script: Path, student: Path, teacher: Path, layout: argparse.Namespace,
                        iters: int, load: Path | None, save: Path | None) -> list[str]:  # fmt: skip
    from megatron_prune import api
    from megatron_prune.checkpoint.metadata import CheckpointMeta

    vocab = CheckpointMeta.read(teacher).arch.vocab_size
    world = layout.tp * layout.pp
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
    cmd += [str(TOOLS / "megatron_lm_cpu.py"), str(script), *api.megatron_lm_args(student),
            "--transformer-impl", "local",
            "--tensor-model-parallel-size", str(layout.tp),
            "--pipeline-model-parallel-size", str(layout.pp),
            "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(GLOBAL_BATCH),
            "--seq-length", str(SEQ_LEN), "--train-iters", str(iters),
            "--lr", "1e-4", "--min-lr", "1e-5", "--seed", "1234",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab - 1),
            "--kd-teacher", str(teacher), "--calculate-per-token-loss",
            "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
            "--ckpt-format", "torch_dist"]  # fmt: skip
    if layout.vpp:
        cmd += ["--num-layers-per-virtual-pipeline-stage",
                str(CheckpointMeta.read(student).arch.num_layers // (layout.pp * layout.vpp))]
    if layout.device == "cpu":
        cmd += ["--distributed-backend", "gloo", "--no-gradient-accumulation-fusion",
                "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
                "--no-persist-layer-norm"]  # fmt: skip
    if layout.bf16:
        cmd += ["--bf16"]
    if load is not None:
        cmd += ["--load", str(load), "--finetune", "--no-load-optim", "--no-load-rng"]
    if save is not None:
        cmd += ["--save", str(save), "--save-interval", str(iters)]
    return cmd


def run_megatron_lm(name: str, cmd: list[str], cwd: Path, work: Path) -> dict:
    """Run one Megatron-LM job; its log, its first-iteration KL and its dumped logits."""
    dump = work / f"dump_{name}"
    dump.mkdir()
    env = {**os.environ, "MEGATRON_LM_CPU_DUMP": str(dump), "PYTHONPATH": str(cwd)}
    log = work / f"{name}.log"
    print(f"[check_megatron_lm] {name}: {' '.join(cmd[5:])}", flush=True)
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    code = code.returncode
    text = log.read_text()
    if code != 0:
        print(text[-6000:], file=sys.stderr)
        fail(f"Megatron-LM run '{name}' failed (exit {code}); its log is {log}")
    # One value per iteration line; training_log leaves out averages that are not > 0
    # (training.py, "if avg > 0.0"), so a line without "kl:" logged a KL of exactly 0.
    kls = [float(m[1]) if (m := re.search(r"\| kl: ([0-9.Ee+-]+)", line)) else 0.0
           for line in re.findall(r"iteration\s+\d+/\s*\d+ \|.*", text)]  # fmt: skip
    return {"log": str(log), "kl": kls, "dump": dump,
            "loaded": "successfully loaded checkpoint" in text}  # fmt: skip


def prune_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    """megatron-prune's own whole-vocabulary logits for ``checkpoint`` (TP=1, fp32)."""
    from megatron_prune import api
    from megatron_prune.evaluate.forward import full_logits

    model = api.open_model(checkpoint, device="cpu")
    return full_logits(model.chunks, tokens, model.arch.vocab_size)


def logits_gap(run: dict, checkpoint: Path) -> float:
    tokens = torch.load(run["dump"] / "tokens.pt")
    theirs = torch.load(run["dump"] / "logits.pt")
    ours = prune_logits(checkpoint, tokens)
    return float((theirs[..., : ours.shape[-1]] - ours).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-lm", type=Path, required=True, help="Megatron-LM checkout")
    parser.add_argument("--source", default=None,
                        help="teacher: any `convert` source (default: SmolLM2-135M)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--bf16", action="store_true", help="Megatron-LM's --bf16 (both models)")
    parser.add_argument("--workdir", type=Path, default=None, help="kept (default: temporary)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest logits gap accepted (fp32; raise it for --bf16)")
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkout = args.megatron_lm.resolve()
    preflight(checkout)
    if args.source is None:
        from megatron_prune.data.models import smollm2_135m_gguf

        args.source = f"gguf:{smollm2_135m_gguf()}"

    work = args.workdir or Path(tempfile.mkdtemp(prefix="check_megatron_lm_"))
    work.mkdir(parents=True, exist_ok=True)
    code_dir = work / "megatron_lm"
    script = copy_training_code(checkout, code_dir)
    models = make_models(args.source, work)
    teacher, student = models["teacher"], models["student"]

    def job(name, model, iters, load, save=None):
        cmd = megatron_lm_command(script, model, teacher, args, iters, load, save)
        return run_megatron_lm(name, cmd, code_dir, work)

    pruned = job("pruned", student, 3, student, save=work / "saved")
    keep_all = job("keep_all", models["keep_all"], 1, models["keep_all"])
    random_student = job("random", student, 1, None)
    resumed = job("resumed", student, 1, work / "saved")

    from megatron_prune import api
    from megatron_prune.checkpoint.metadata import CheckpointMeta

    api.convert(str(work / "saved"), work / "saved_converted")
    report = {
        "megatron_lm": str(checkout), "layout": {"tp": args.tp, "pp": args.pp, "vpp": args.vpp},
        "device": args.device, "bf16": args.bf16, "kl_pruned": pruned["kl"],
        "kl_keep_all_first": keep_all["kl"][0], "kl_random_first": random_student["kl"][0],
        "loaded": {"pruned": pruned["loaded"], "resumed": resumed["loaded"],
                   "random": random_student["loaded"]},
        "logits_gap_loaded_student": logits_gap(pruned, student),
        "logits_gap_saved_converted": logits_gap(resumed, work / "saved_converted"),
        "converted_arch_equal": CheckpointMeta.read(work / "saved_converted").arch
        == CheckpointMeta.read(student).arch,
    }  # fmt: skip
    checks = {
        "pruned student loaded and distilled": report["loaded"]["pruned"]
        and len(pruned["kl"]) == 3 and not report["loaded"]["random"],
        "keep-everything student starts at KL ~ 0, random far above": report["kl_keep_all_first"]
        < 1e-3 < 0.1 * report["kl_random_first"],
        "loaded student's logits equal megatron-prune's":
        report["logits_gap_loaded_student"] <= args.tolerance,
        "--save output converts to the logits Megatron-LM loads": report["converted_arch_equal"]
        and report["logits_gap_saved_converted"] <= args.tolerance,
    }  # fmt: skip
    report["checks"] = checks
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
