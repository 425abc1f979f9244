"""Print the Markdown table of every setting (service/settings.py) for docs/deploy.md.

usage: .venv/bin/python .ci/deploy_settings_table.py
tests/test_deploy.py checks that docs/deploy.md holds exactly this output between the
<!-- settings-table:start --> and <!-- settings-table:end --> markers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.settings import REPO_ROOT, Settings  # noqa: E402


def default_text(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Path):
        try:
            return f"`{value.relative_to(REPO_ROOT)}` (in the repository)"
        except ValueError:
            return f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def table() -> str:
    lines = ["| Variable | Field | Default | Description |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `LDIT_{name.upper()}` | `{name}` | {default_text(field.default)} | {description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
