"""qolora.training.reporting: the loss plot's running mean (a step's loss swings with its batch; the mean shows
the trend)."""

from __future__ import annotations

from qolora.training.reporting import plot_losses, running_mean


def test_running_mean_averages_the_last_window_values():
    assert running_mean([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
    assert running_mean([5.0], 3) == [5.0]


def test_the_plot_draws_the_mean_beside_each_step(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    real = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    history = [{"step": i, "loss": 3.0 + (i % 3)} for i in range(1, 41)]
    assert plot_losses(history, [{"step": 40, "eval_loss": 2.9}], tmp_path / "loss.png").is_file()
    assert labels == ["train (each step one batch: swings with its examples)", "train (mean of the last 5 steps)",
                      "eval"]
