"""The pure-noise norm report: the same draws for every optimizer, displacements on the way."""

from __future__ import annotations

import torch

from benchmarks.noise_norm import main, norm_under_noise


def test_the_same_optimizer_on_the_same_draws_gives_the_same_norms_and_sgd_moves_by_its_steps() -> None:
    """Two runs of one optimizer agree to the bit (the draws are fixed); plain SGD at lr η on
    N(0, 1) noise moves by about η·sqrt(t·n) after t steps over n parameters."""
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1e-3)  # noqa: E731
    first, second = norm_under_noise(sgd, 10), norm_under_noise(sgd, 10)
    assert first == second and set(first[2]) == {1, 3, 10}
    n = 10 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4
    assert abs(first[2][10] / (1e-3 * (10 * n) ** 0.5) - 1) < 0.1


def test_the_report_has_a_row_per_optimizer(capsys) -> None:
    main(["--steps", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "optimizer" not in line]
    assert [r.split(" | ")[0] for r in rows][1:] == ["| NFN bare", "| NFN for_model"] and rows[0].startswith("| Adam")
