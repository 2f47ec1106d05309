"""The Python API as a user scripts it, and the CLI's error contract.

* The README's "Python API" example runs as written (on a tiny model) and its numbers are real:
  the pruned model is smaller and its perplexity is finite and different.
* A genuine bug (a surgery function that raises KeyError) surfaces with its traceback and exit
  code 1, not as a one-line refusal with code 2.
* A refusal raised on every rank of a TP=3 job is printed once.
"""

import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO, _env, cli
from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer


def readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, austen_calibration_text, austen_eval_text):
    tmp = tmp_path_factory.mktemp("api")
    text = austen_calibration_text.read_text()[:100_000]
    (tmp / "calibration.txt").write_text(text)
    (tmp / "heldout.txt").write_text(austen_eval_text.read_text()[:20_000])
    model = make_hf_model("llama", seed=5, num_attention_heads=6, num_key_value_heads=3,
                          head_dim=8, hidden_size=48, intermediate_size=96,
                          vocab_size=384)  # fmt: skip
    save_word_tokenizer(save_hf_model(model, tmp / "hf_model"), text, vocab_size=384)
    target = {"num_layers": 3, "hidden_size": 40, "ffn_hidden_size": 48}
    (tmp / "target.yaml").write_text(yaml.safe_dump(target))
    (tmp / "example.py").write_text(readme_example())
    run = subprocess.run([sys.executable, "example.py"], cwd=tmp, capture_output=True,
                         text=True, env=_env(), timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return tmp, run.stdout


def test_readme_python_api_example_runs(workdir):
    tmp, stdout = workdir
    match = re.search(r"ppl ([\d.]+) -> ([\d.]+)", stdout)
    assert match, stdout
    before, after = map(float, match.groups())
    assert before > 1 and after > 1 and before != after
    meta = json.loads((tmp / "pruned" / "megatron_prune.json").read_text())["arch"]
    assert (meta["num_layers"], meta["hidden_size"], meta["ffn_hidden_size"]) == (3, 40, 48)
    assert (tmp / "pruned_hf" / "config.json").is_file()


def test_a_bug_shows_its_traceback_and_is_not_a_refusal(workdir):
    tmp, _ = workdir
    code = (
        "import sys\n"
        "import megatron_prune.stages.prune as stage\n"
        "def broken(plan, k, sources):\n"
        "    raise KeyError('self_attention.linear_qkv.weight')\n"
        "stage.prune_layer = broken\n"
        "from megatron_prune.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, "prune", "ckpt", "--scores", "scores", "--target",
         "target.yaml", "--out", "broken"],
        cwd=tmp, capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "Traceback" in run.stderr and "KeyError" in run.stderr
    assert "this is a bug in megatron-prune" in run.stderr
    assert "error:" not in run.stderr
    assert not (tmp / "broken").exists() and not (tmp / "broken.partial").exists()


def _one_refusal(result, needle):
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


def test_every_rank_refusing_prints_one_line_at_tp3(workdir):
    tmp, _ = workdir
    ckpt = str(tmp / "ckpt")
    # refused inside each of the 3 ranks, after the launch: the launcher prints it once; a
    # --nproc-per-node the layout cannot use is refused before any launch
    _one_refusal(cli("generate", ckpt, "--prompt", "", "--tp", "3"), "the prompt is empty")
    _one_refusal(cli("eval", "ppl", ckpt, "--data", str(tmp / "heldout.txt"), "--tp", "3",
                     "--nproc-per-node", "2"), "needs a multiple of 3 ranks")  # fmt: skip
