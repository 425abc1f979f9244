"""The engine build's knobs: which bundle, where the artifacts go, the TensorRT batch profile and
the decoder's precision.

`build_engine.py` takes its defaults from here. They are read from the same `LDIT_*` variables,
with the same defaults and limits, as the service's settings (`service/settings.py`, the place
where they are documented); the service maps its own settings onto this object
(`Settings.engine_build()`), and `tests/test_build_engine.py` checks that the two agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class EngineBuildConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LDIT_", extra="ignore", env_ignore_empty=True,
                                      protected_namespaces=())

    model_dir: Path = REPO_ROOT / "checkpoints" / "demo"
    engine_dir: Path = REPO_ROOT / "engines_out"
    min_batch_size: int = Field(1, ge=1)
    preferred_batch_size: int | None = Field(None, ge=1)
    max_batch_size: int = Field(16, ge=1, le=4096)
    decode_precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    @property
    def profile_opt_rows(self) -> int:
        """TensorRT's 'opt' rows: the preferred batch, else the largest."""
        return self.preferred_batch_size or self.max_batch_size

    def cli_args(self) -> list[str]:
        """The same knobs as `build_engine.py` arguments, for a process started with another environment."""
        return ["--model-dir", str(self.model_dir), "--output-dir", str(self.engine_dir),
                "--min-rows", str(self.min_batch_size), "--opt-rows", str(self.profile_opt_rows),
                "--max-rows", str(self.max_batch_size), "--decode-precision", self.decode_precision]
