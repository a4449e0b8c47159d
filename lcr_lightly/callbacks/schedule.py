"""When an every-N-epochs callback runs."""

from __future__ import annotations


def is_due(epoch: int, every_n_epochs: int) -> bool:
    """Whether a callback that runs every ``every_n_epochs`` epochs runs after ``epoch``.

    Args:
        epoch: The 0-based epoch that just ended (``trainer.current_epoch``).
        every_n_epochs: The period N (positive).

    Returns:
        True after epochs N - 1, 2N - 1, ... (the N-th, 2N-th, ... epoch).
    """
    return (epoch + 1) % every_n_epochs == 0
