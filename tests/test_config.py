"""Run config: validation errors name the key path and line; ${VAR} secrets never leak."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from distill4all.config import load_config
from distill4all.errors import ConfigError

GOOD = """\
name: demo
run_dir: out/run
collect:
  sources:
    - name: qs
      path: prompts.jsonl
  teachers:
    - model: tiny
      max_tokens: 8
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_valid_config_fills_defaults_and_resolves_paths(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, GOOD))
    cfg = loaded.config
    assert cfg.run_dir == (tmp_path / "out" / "run").resolve()
    assert cfg.collect is not None
    assert cfg.collect.sources[0].path == (tmp_path / "prompts.jsonl").resolve()
    assert cfg.collect.teachers[0].name == "teacher"  # default
    assert cfg.collect.teachers[0].temperature == 0.0
    assert cfg.configured_stages() == ["collect"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("      max_tokens: 8", "      max_tokens: 8\n      colour: red"), ":10: collect.teachers[0].colour: unknown key"),
        (GOOD.replace("max_tokens: 8", "max_tokens: lots"), ":9: collect.teachers[0].max_tokens: Input should be a valid integer"),
        (GOOD.replace("max_tokens: 8", "max_tokens: 0"), ":9: collect.teachers[0].max_tokens: Input should be greater than or equal to 1"),
        (GOOD.replace("    - model: tiny\n      max_tokens: 8", "    - max_tokens: 8"), ":8: collect.teachers[0].model: required key is missing"),
        (GOOD.replace("      path: prompts.jsonl\n", ""), ":5: collect.sources[0]: format jsonl needs `path`"),
        (GOOD.replace("name: demo\n", ""), ": name: required key is missing"),
        (GOOD.replace("run_dir: out/run", "run_dir: [unclosed"), ":3: YAML syntax error"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        (GOOD + "train:\n  base_model: tiny\n  lora: {r: 0}\n", ":12: train.lora.r: Input should be greater than or equal to 1"),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range", "missing-key", "rule", "missing-top", "yaml-syntax", "not-mapping", "nested"],
)  # fmt: skip
def test_each_kind_of_error_names_its_place(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)
    # and through the CLI: one line, exit code 2, no traceback
    r = run_cli("config", "check", path)
    assert r.code == 2, r.output
    assert r.stderr.startswith("error: ") and expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output


def test_duplicate_source_names_are_rejected(tmp_path: Path) -> None:
    text = GOOD.replace(
        "      path: prompts.jsonl\n", "      path: prompts.jsonl\n    - name: qs\n      path: b.jsonl\n"
    )
    with pytest.raises(ConfigError, match=r"collect.sources: .*repeated: qs"):
        load_config(write(tmp_path, text))


def test_missing_file_and_debug_traceback(tmp_path: Path) -> None:
    r = run_cli("config", "check", tmp_path / "nope.yaml")
    assert r.code == 2 and r.stderr.strip() == f"error: config file not found: {tmp_path / 'nope.yaml'}"
    r = run_cli("--debug", "config", "check", tmp_path / "nope.yaml")
    assert r.code != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr


SECRET_CONFIG = """\
name: s
run_dir: run
collect:
  sources: [{name: qs, path: "${D4A_DATA:-prompts}.jsonl"}]
  teachers:
    - model: tiny
      system_prompt: "Secret word: ${D4A_WORD}"
      api_key: ${D4A_KEY}
"""


def test_env_interpolation_uses_values_but_shows_the_reference(tmp_path: Path) -> None:
    env = {"D4A_KEY": "sk-very-secret-123", "D4A_WORD": "swordfish"}
    loaded = load_config(write(tmp_path, SECRET_CONFIG), env=env)
    assert loaded.config.collect is not None
    key = loaded.config.collect.teachers[0].api_key
    assert key is not None and key.get_secret_value() == "sk-very-secret-123"
    assert loaded.config.collect.teachers[0].system_prompt == "Secret word: swordfish"
    assert loaded.config.collect.sources[0].path == (tmp_path / "prompts.jsonl").resolve()  # default used
    public = loaded.public_dict()
    assert public["collect"]["teachers"][0]["api_key"] == "${D4A_KEY}"
    assert public["collect"]["teachers"][0]["system_prompt"] == "Secret word: ${D4A_WORD}"
    assert "sk-very-secret" not in str(public) and "swordfish" not in str(public)
    # the hash does not depend on the secret's value
    other = load_config(tmp_path / "run.yaml", env={"D4A_KEY": "another", "D4A_WORD": "x"})
    assert other.hash() == loaded.hash()

    r = run_cli("config", "show", tmp_path / "run.yaml", env=env)
    assert r.code == 0, r.output
    shown = yaml.safe_load(r.stdout)
    assert shown["collect"]["teachers"][0]["api_key"] == "${D4A_KEY}"
    assert shown["collect"]["teachers"][0]["temperature"] == 0.0  # defaults are filled in
    assert "sk-very-secret" not in r.output and "swordfish" not in r.output


def test_missing_env_var_is_an_error_with_its_place(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"run.yaml:8: collect.teachers\[0\].api_key: environment variable D4A_KEY is not set"
    ):
        load_config(write(tmp_path, SECRET_CONFIG), env={"D4A_WORD": "x"})


def test_dollar_escape(tmp_path: Path) -> None:
    loaded = load_config(
        write(tmp_path, GOOD.replace("max_tokens: 8", "max_tokens: 8\n      system_prompt: costs $$5"))
    )
    assert loaded.config.collect is not None
    assert loaded.config.collect.teachers[0].system_prompt == "costs $5"


def test_init_writes_a_starter_that_validates_and_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "mine.yaml"
    r = run_cli("init", target)
    assert r.code == 0, r.output
    text = target.read_text()
    assert text.count("#") > 5  # commented
    r = run_cli("config", "check", target)
    assert r.code == 0 and "ok" in r.stdout
    r = run_cli("init", target)
    assert r.code == 2 and "exists" in r.stderr
    assert target.read_text() == text


def test_shipped_example_configs_validate() -> None:
    env = {"OPENAI_API_KEY": "sk-example"}
    for name in ("demo.yaml", "gpt4all-paper.yaml"):
        r = run_cli("config", "check", REPO / "examples" / name, env=env)
        assert r.code == 0, r.output
    paper = load_config(REPO / "examples" / "gpt4all-paper.yaml", env=env).config
    assert paper.collect is not None and paper.train is not None and paper.curate is not None
    assert [(s.name, s.format) for s in paper.collect.sources] == [
        ("unified_chip2", "oig_chip2"), ("stackoverflow", "stackoverflow"), ("p3", "p3")
    ]  # fmt: skip
    teacher = paper.collect.teachers[0]
    assert teacher.model == "gpt-3.5-turbo" and teacher.base_url == "https://api.openai.com/v1"
    assert teacher.api_key is not None and teacher.api_key.get_secret_value() == "sk-example"
    assert (paper.train.lora.r, paper.train.lora.alpha, paper.train.lora.dropout) == (8, 32, 0.1)
    assert paper.train.lora.target_modules == ["q_proj", "v_proj"]
    assert (paper.train.learning_rate, paper.train.global_batch_size, paper.train.epochs) == (5e-5, 32, 4)
    assert (paper.train.max_length, paper.train.warmup_steps, paper.train.num_processes) == (1024, 100, 8)
    assert paper.curate.exclude_sources == ["p3"]
    assert paper.export is not None and paper.export.quantizations == ["q4_0"]
    assert paper.eval is not None and paper.eval.baseline == "alpaca-lora" and paper.eval.clip == 100
    r = run_cli("config", "check", REPO / "examples" / "gpt4all-paper.yaml", env={"OPENAI_API_KEY": ""})
    assert r.code == 0  # set but empty is the user's business; unset is an error:
    import os

    clean = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    p = subprocess.run([sys.executable, "-m", "distill4all", "config", "check", str(REPO / "examples" / "gpt4all-paper.yaml")],
                       capture_output=True, text=True, env=clean)  # fmt: skip
    assert p.returncode == 2 and "environment variable OPENAI_API_KEY is not set" in p.stderr


def test_version_and_usage_errors() -> None:
    r = run_cli("--version")
    assert r.code == 0 and r.stdout.startswith("distill4all ")
    r = run_cli("no-such-command")
    assert r.code == 2 and "Traceback" not in r.output


def test_a_judge_asked_for_several_samples_is_refused_not_ignored(tmp_path: Path) -> None:
    text = "name: j\nrun_dir: run\neval:\n  data: items.jsonl\n  judge:\n    judge:\n      model: m\n      samples: 3\n"
    with pytest.raises(ConfigError, match=r"eval.judge: judge.samples must be 1"):
        load_config(write(tmp_path, text))


def test_yaml_aliases_that_loop_or_explode_are_one_line_errors(tmp_path: Path) -> None:
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: x\nrun_dir: r\nextra: &x [1, *x]\n")
    laughs = ["name: x", "run_dir: r", "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    laughs += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 values
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(laughs) + "\n")
    for path, message in ((loop, "a YAML alias refers to a value that contains it"),
                          (bomb, "the config expands to more than 1,000,000 values")):  # fmt: skip
        r = run_cli("config", "check", path)
        assert r.code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {message}"), lines
    shared = tmp_path / "shared.yaml"  # an alias used twice, without a loop, is fine
    shared.write_text("name: x\nrun_dir: r\nseed: &s 3\nx-note: [*s, *s]\n")
    with pytest.raises(ConfigError, match="x-note"):  # an unknown key, found past the aliases
        load_config(shared)


def test_credentials_in_a_url_never_reach_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "q"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "name: x\nrun_dir: run\ncollect:\n  sources: [{name: s, path: p.jsonl}]\n"
        "  teachers: [{name: t, model: m, max_retries: 0, base_url: 'http://alice:s3cret@127.0.0.1:9/v1'}]\n"
    )
    r = run_cli("config", "show", cfg)
    assert r.code == 0 and "s3cret" not in r.stdout and "http://***@127.0.0.1:9/v1" in r.stdout, r.output
    run_cli("run", cfg, "--no-report")  # no server there: it fails, but writes its manifest first
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    assert "s3cret" not in manifest and "alice" not in manifest and "***@127.0.0.1:9" in manifest
