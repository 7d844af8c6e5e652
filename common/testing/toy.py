"""A tiny regression task that exercises the training entrypoint (resume, DDP, loggers) in seconds.

Not a model family: it exists so tests and `make train-toy` can check the infrastructure in isolation.
"""

from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch
import torchmetrics
from torch import nn
from torch.utils.data import Dataset

from common.data.base import BaseDataModule
from common.shapes import assert_same_shape


class _ArrayDataset(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"x": self.x[i], "y": self.y[i]}


class ToyRegressionData(BaseDataModule):
    """y = tanh(x W) + noise, fixed by ``data_seed`` (independent of the training seed)."""

    def __init__(self, n_train: int = 256, n_val: int = 64, n_test: int = 64, dim: int = 8,
                 noise: float = 0.05, data_seed: int = 0, with_test: bool = True, **kwargs) -> None:
        super().__init__(test_split="test" if with_test else None, **kwargs)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.dim, self.noise, self.data_seed, self.with_test = dim, noise, data_seed, with_test

    def build_dataset(self, split: str) -> Dataset:
        rng = np.random.default_rng([self.data_seed, ["train", "val", "test"].index(split)])
        w = np.random.default_rng(self.data_seed).normal(size=(self.dim, 1)).astype(np.float32)
        x = rng.normal(size=(self.sizes[split], self.dim)).astype(np.float32)
        y = np.tanh(x @ w) + self.noise * rng.normal(size=(len(x), 1)).astype(np.float32)
        return _ArrayDataset(x, y.astype(np.float32))


class ToyRegressor(L.LightningModule):
    """MLP with dropout (so resume must restore the random state too). x [b, dim] -> y [b, 1]."""

    def __init__(self, dim: int = 8, hidden: int = 32, dropout: float = 0.1, optimizer=None, scheduler=None,
                 step_delay_s: float = 0.0):
        super().__init__()
        self.step_delay_s = step_delay_s  # lets tests interrupt a run mid-epoch
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.val_mse = torchmetrics.MeanSquaredError()
        self.test_mse = torchmetrics.MeanSquaredError()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        pred = self(batch["x"])
        assert_same_shape(pred, batch["y"])
        loss = torch.mean((pred - batch["y"]) ** 2)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_mse(self(batch["x"]), batch["y"])
        self.log("val/loss", self.val_mse, prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.test_mse(self(batch["x"]), batch["y"])
        self.log("test/loss", self.test_mse)

    def configure_optimizers(self):
        opt = (self.optimizer_factory or torch.optim.Adam)(self.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "epoch"}}
