"""common.callbacks.EMA: the moving average never hands back weights from before the run's setup."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.callbacks import EMA


class LoadsWeightsInSetup(L.LightningModule):
    """Like HandPoseLit with a Stage 1 checkpoint: the real starting weights arrive in setup()."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.loaded = False

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.loaded:
            with torch.no_grad():
                self.layer.weight.fill_(3.0)
                self.layer.bias.fill_(-1.0)
            self.loaded = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, callback: EMA, epochs: int) -> tuple[LoadsWeightsInSetup, dict]:
    """8 steps per epoch; returns the module after fit and the checkpoint written at the end of the last epoch."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    module = LoadsWeightsInSetup()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[callback, ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return module, torch.load(tmp_path / "last.ckpt", weights_only=False)


def test_run_shorter_than_the_averaging_start_keeps_its_trained_weights(tmp_path):
    # Lightning's EMAWeightAveraging copied the model before setup() and wrote that copy back at the end: the
    # module would leave fit with weight 0.x (random init) instead of about 3.
    module, ckpt = _fit(tmp_path, EMA(decay=0.9, update_starting_at_step=100), epochs=1)
    assert abs(float(module.layer.weight.mean()) - 3.0) < 0.5  # trained from the loaded 3.0, not the init
    for k, v in ckpt["current_model_state"].items():
        assert torch.equal(ckpt["state_dict"][k], v), k  # nothing averaged yet: the average is the model


def test_average_lags_the_weights_once_started(tmp_path):
    module, ckpt = _fit(tmp_path, EMA(decay=0.9, update_starting_at_step=2), epochs=2)
    avg, raw = ckpt["state_dict"]["layer.weight"], ckpt["current_model_state"]["layer.weight"]
    assert not torch.equal(avg, raw) and int(ckpt["averaging_state"]["n_averaged"]) > 0
    assert abs(float(avg.mean()) - 3.0) < 0.5  # averaged from the loaded weights
    torch.testing.assert_close(module.layer.weight, avg)  # after fit the module holds the average
