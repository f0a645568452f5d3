"""The click test runner the CLI tests share."""
from click.testing import CliRunner


def cli_runner() -> CliRunner:
    """stdout and stderr apart: click >= 8.2 always separates them; older click needs mix_stderr=False."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()
