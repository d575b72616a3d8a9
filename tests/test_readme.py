"""The README's "API at a glance" example runs as written (with fewer training steps)."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_at_a_glance_runs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## API at a glance", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "steps=200" in code
    code = code.replace("steps=200", "steps=12")  # still above the default warmup
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "out/arith/adapter_config.json").exists()
    assert (tmp_path / "out/arith/adapter_model.safetensors").exists()
    ml = namespace["ml"]
    assert not any(isinstance(m, ml.LoraLayer) for m in namespace["merged"].modules())
    assert "trainable params: 14,336" in capsys.readouterr().out


def test_qlora_example_runs_after_the_api_example(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    first, qlora = re.findall(r"```python\n(.*?)```", readme.split("## API at a glance", 1)[1], re.S)[:2]
    assert "quantize_model" in qlora and qlora.count("steps=200") == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(first.replace("steps=200", "steps=12"), "README.md", "exec"), namespace)
    exec(compile(qlora.replace("steps=200", "steps=12"), "README.md", "exec"), namespace)
    ml = namespace["ml"]
    kinds = {type(m) for m in namespace["full"].modules()}
    assert not kinds & {ml.Linear4bit, ml.LoraLayer, ml.LoraLinear4bit}


def test_dora_and_ia3_example_runs_after_the_api_example(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme.split("## API at a glance", 1)[1], re.S)
    first, methods = blocks[0], blocks[2]
    assert "use_dora=True" in methods and "IA3Config" in methods and methods.count("steps=200") == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(first.replace("steps=200", "steps=12"), "README.md", "exec"), namespace)
    exec(compile(methods.replace("steps=200", "steps=12"), "README.md", "exec"), namespace)
    ml = namespace["ml"]
    assert json.loads((tmp_path / "out/lora/adapter_config.json").read_text())["use_dora"] is True
    assert json.loads((tmp_path / "out/ia3/adapter_config.json").read_text())["peft_type"] == "IA3"
    assert not any(isinstance(m, (ml.LoraLayer, ml.IA3Layer)) for m in namespace["merged"].modules())


def test_adalora_example_runs_after_the_api_example(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme.split("## API at a glance", 1)[1], re.S)
    first, ada = blocks[0], blocks[3]
    assert "AdaLoraConfig" in ada and ada.count("total_step=200") == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(first.replace("steps=200", "steps=12"), "README.md", "exec"), namespace)
    # a shorter schedule of the same shape: warm-up, falling budget, final phase
    short = ada.replace("tinit=20, tfinal=40, deltaT=10, total_step=200", "tinit=2, tfinal=4, deltaT=2, total_step=14")
    exec(compile(short, "README.md", "exec"), namespace)
    config = json.loads((tmp_path / "out/adalora/adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"]
    kept = sum(sum(v) for v in config["rank_pattern"].values())
    assert kept == 8 * len(config["rank_pattern"])  # target_r per layer on average


def test_mixture_example_runs_after_the_api_example(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme.split("## API at a glance", 1)[1], re.S)
    first, mixture = blocks[0], blocks[4]
    assert "ml.Mixture" in mixture
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(first.replace("steps=200", "steps=12"), "README.md", "exec"), namespace)
    capsys.readouterr()
    exec(compile(mixture, "README.md", "exec"), namespace)
    answer = capsys.readouterr().out.split(" tensor(")[0].strip()
    example = namespace["ml"].load_task("facts", "test")[0]
    assert answer == example["output"]  # the facts adapter, routed to, answers the first facts prompt
    assert namespace["mix"].history[0, 0].argmax().item() == list(namespace["router"].tasks).index("facts")
