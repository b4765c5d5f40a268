"""The resumable state (core.checkpoint.TrainingState): what is saved comes back whole, a file that does not fit
is refused with its name, and counters from the file are taken only where this run counts the same thing."""

from __future__ import annotations

import pytest
import torch

from core.checkpoint import TrainingState


def _state(seed: int, width: int = 4) -> TrainingState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    progress = {"epoch": 0, "step_in_epoch": 0, "best_auc": -1.0, "elapsed": 0.0}
    return TrainingState(model, optimizer, scheduler, torch.Generator().manual_seed(seed), progress)


def _train_a_step(state: TrainingState) -> None:
    state.optimizer.zero_grad()
    loss = state.model(torch.randn(5, 3)).sum()
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()


def test_a_restored_state_continues_as_the_saved_one_would(tmp_path):
    saved = _state(0)
    _train_a_step(saved)
    saved.progress.update(epoch=2, step_in_epoch=3, best_auc=0.9, elapsed_now=lambda: 0.0)
    saved.save(tmp_path / "last.pt", elapsed=12.5)
    restored = _state(1)
    restored.restore(tmp_path / "last.pt")
    assert restored.progress == {"epoch": 2, "step_in_epoch": 3, "best_auc": 0.9, "elapsed": 12.5}
    for a, b in zip(saved.model.parameters(), restored.model.parameters()):
        assert torch.equal(a, b)
    assert restored.scheduler.last_epoch == 1
    assert torch.equal(restored.aug_gen.get_state(), saved.aug_gen.get_state())
    torch.manual_seed(7)
    _train_a_step(saved)
    torch.manual_seed(7)
    _train_a_step(restored)
    for a, b in zip(saved.model.parameters(), restored.model.parameters()):
        assert torch.equal(a, b)  # same optimizer moments and learning rate


def test_a_state_of_another_model_is_refused_naming_the_file(tmp_path):
    _state(0, width=4).save(tmp_path / "last.pt", elapsed=0.0)
    other = _state(0, width=8)
    with pytest.raises(ValueError, match="last.pt does not fit"):
        other.restore(tmp_path / "last.pt")


def test_counters_of_a_different_type_or_unknown_to_this_run_are_not_taken(tmp_path):
    saved = _state(0)
    saved.progress.update(epoch="3", stranger=1)
    saved.save(tmp_path / "last.pt", elapsed=1.0)
    restored = _state(0)
    restored.restore(tmp_path / "last.pt")
    assert restored.progress == {"epoch": 0, "step_in_epoch": 0, "best_auc": -1.0, "elapsed": 1.0}


def test_a_state_saved_without_the_fused_kernel_resumes_with_it(tmp_path):
    """How the step is computed is the resuming process's choice: a last.pt from before fused kernels were used
    does not switch them off."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    plain = TrainingState(model, torch.optim.AdamW(model.parameters(), lr=0.01), None, torch.Generator(), {})
    plain.save(tmp_path / "last.pt", elapsed=0.0)
    fused = TrainingState(model, torch.optim.AdamW(model.parameters(), lr=0.05, fused=True), None,
                          torch.Generator(), {})
    fused.restore(tmp_path / "last.pt")
    assert fused.optimizer.param_groups[0]["fused"] is True
    assert fused.optimizer.param_groups[0]["lr"] == 0.01  # the state itself comes from the file
