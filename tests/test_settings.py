from pathlib import Path

import pytest

from ml_backend.settings import Settings
from model.errors import ConfigError


def test_defaults_need_no_environment() -> None:
    s = Settings.from_env({})
    assert s.redis_url is None and s.port == 9090 and s.model_dir == Path("./taxomoco-data")


def test_env_and_overrides_are_parsed() -> None:
    s = Settings.from_env(
        {"TAXOMOCO_PORT": "1234", "ALLOWED_IMAGE_HOSTS": "a.com, b.com", "POST_FLAGS_TO_LABEL_STUDIO": "no"},
        model_dir=Path("/tmp/m"),
        port="4321",
    )
    assert s.port == 4321 and s.allowed_image_hosts == ("a.com", "b.com")
    assert s.post_flags_to_label_studio is False and s.project(7).root == Path("/tmp/m/project-7")


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"TAXOMOCO_PORT": "x"}, "TAXOMOCO_PORT='x' is not a valid int"),
        ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_PASS"),
        ({"ENCODER_ARCH": "vit"}, "resnet18-half"),
        ({"LABEL_STUDIO_API_KEY": "k"}, "LABEL_STUDIO_URL"),
        ({"WEBHOOK_REQUIRE_AUTH": "true"}, "BASIC_AUTH_USER"),
        ({"MODEL_CHOICE": "best"}, "MODEL_CHOICE='best': use one of mean, one-se"),
    ],
)
def test_bad_values_name_the_variable_and_the_fix(env: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings.from_env(env)


def test_every_setting_is_documented() -> None:
    rows = Settings.describe()
    assert len({name for name, _, _ in rows}) == len(rows)
    assert all(help_text for _, _, help_text in rows)


def test_readme_lists_every_setting_with_its_default() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name, default, _ in Settings.describe():
        assert f"| `{name}` | `{default}` |" in readme, f"README's settings table lacks {name} (default {default})"


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_wait_passively_unless_the_operator_says_otherwise(given: str | None, expected: str) -> None:
    """The product's processes load torch with OMP_WAIT_POLICY=PASSIVE (spinning OpenMP threads starve a busy
    machine's cores: bench/thread_policy.py); the variable is read once, when torch loads, so a fresh process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import ml_backend.cli, os, sys; assert 'torch' in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
