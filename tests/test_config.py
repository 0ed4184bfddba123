import pytest

from srlm.config import EMBEDDED_MODEL, RunConfig, describe_fields, load_config
from srlm.errors import ConfigError


def test_defaults_are_the_papers():
    c = RunConfig()
    assert (c.candidates.n, c.judge.k, c.candidates.temperature, c.candidates.top_p) == (4, 3, 0.7, 0.9)
    assert (c.prompts.few_shot_human, c.prompts.few_shot_model, c.prompts.temperature) == (6, 2, 0.6)
    assert (c.dpo.beta, c.dpo.learning_rate, c.dpo.min_learning_rate, c.dpo.batch_size) == (0.1, 1e-6, 1e-7, 16)
    assert (c.sft.learning_rate, c.sft.min_learning_rate, c.sft.dropout) == (5.5e-6, 1.1e-6, 0.1)
    assert c.prompts.rouge_l_max == 0.7 and c.dpo.reference == "previous"
    assert c.model.name_or_path == EMBEDDED_MODEL and not c.model.allow_online and not c.model.trust_remote_code


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_presets_load(preset):
    assert isinstance(load_config(preset=preset), RunConfig)


def test_the_paper_preset_is_the_defaults_at_the_papers_scale():
    # What paper.yaml's header says: it differs from the (paper-citing) defaults in the number of prompts alone.
    paper, defaults = load_config(preset="paper").model_dump(), RunConfig().model_dump()
    differ = {f"{section}.{key}" for section, values in paper.items() if isinstance(values, dict)
              for key, value in values.items() if value != defaults[section][key]}
    differ |= {key for key, value in paper.items() if not isinstance(value, dict) and value != defaults[key]}
    assert differ == {"prompts.num_prompts"}


def test_no_preset_means_tiny():
    assert load_config() == load_config(preset="tiny")


def test_a_config_file_changes_the_preset_it_is_given_over(tmp_path):
    # A file of two keys gave the built-in defaults for everything else (64 prompts, 512-token responses): not tiny.
    small = tmp_path / "small.yaml"
    small.write_text("candidates:\n  n: 8\n")
    tiny, defaults = load_config(preset="tiny"), RunConfig()
    config = load_config(small)
    assert config.candidates.n == 8 and config.prompts.num_prompts == tiny.prompts.num_prompts != 64
    assert config.model_copy(update={"candidates": tiny.candidates}) == tiny
    assert load_config(small, "none").model_copy(update={"candidates": defaults.candidates}) == defaults


def test_set_overrides_with_types():
    c = load_config(overrides=["candidates.n=6", "judge.template=/tmp/t.txt", "prompts.blocked_keywords=[a, b]"])
    assert c.candidates.n == 6 and str(c.judge.template) == "/tmp/t.txt" and c.prompts.blocked_keywords == ["a", "b"]


@pytest.mark.parametrize("override,message", [
    ("candidates.nn=4", "candidates.nn: unknown key (valid keys here: max_new_tokens, n, temperature, top_p, truncation_warning)"),
    ("judgee.k=3", "judgee: unknown key"),
    ("candidates.n=1", "candidates.n: Input should be greater than or equal to 2"),
    ("judge.k=three", "judge.k: Input should be a valid integer"),
    ("dpo.reference=m7", "dpo.reference"),
    ("sft.min_learning_rate=1", "sft.min_learning_rate must not exceed sft.learning_rate"),
    ("candidates.n", "expected key=value"),
    # A union type's branches in one line, not pydantic's "batch_size.constrained-int" and "batch_size.literal['auto']".
    ("generation.batch_size=0", "generation.batch_size: should be greater than or equal to 1 or 'auto' (found 0)"),
    ("prompts.blocked_keywords=[a, [2]]", "prompts.blocked_keywords.1: Input should be a valid string (found [2])"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert message in str(e.value)


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(preset="huge")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("candidates: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)


def test_every_field_has_help():
    rows = describe_fields()
    assert len(rows) > 40
    assert all(help_text for _, _, help_text in rows)


def test_a_check_across_keys_says_its_message_without_the_whole_config():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["generation.backend=openai", "generation.base_url=http://x/v1", "judge.mode=expected"])
    assert "judge.mode=expected reads the judge's next-token probabilities" in str(e.value)
    assert "(top level)" not in str(e.value) and "'seed'" not in str(e.value) and "Value error" not in str(e.value)


def test_config_list_writes_values_as_set_takes_them(capsys):
    from srlm.cli import main

    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    assert "data.ift_limit = 24   (default: null)" in out and "model.trust_remote_code = false" in out
    assert "None" not in out.replace("(null: all", "") and "True" not in out


def test_a_run_config_names_local_files_and_model_directories_absolutely(tmp_path, monkeypatch):
    from srlm.config import absolute_paths

    (tmp_path / "base").mkdir()
    (tmp_path / "judge").mkdir()
    monkeypatch.chdir(tmp_path)
    config = absolute_paths(load_config(overrides=["model.name_or_path=base", "eval.h2h_judge=judge",
                                                   "judge.template=t.txt"]))
    assert (config.model.name_or_path, config.eval.h2h_judge) == (str(tmp_path / "base"), str(tmp_path / "judge"))
    assert config.judge.template == tmp_path / "t.txt"
    # Not local directories: a hub id, the embedded model, a server's URL stay as given.
    for name in ("org/model", "embedded:smollm2-135m-instruct"):
        assert absolute_paths(load_config(overrides=[f"model.name_or_path={name}"])).model.name_or_path == name
    served = load_config(overrides=["eval.h2h_judge=http://h:8000/v1", "eval.h2h_judge_model=m"])
    assert absolute_paths(served).eval.h2h_judge == "http://h:8000/v1"
