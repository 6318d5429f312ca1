"""One helper for the families' LoRA tests: a few optimizer steps on LoRA weights only lower the loss."""

import torch

from omnilm.training.lora import apply_lora, lora_modules


def lora_steps_lower_the_loss(model, steps=4, **batch):
    apply_lora(model, rank=4, alpha=8.0)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and lora_modules(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for n, p in model.named_parameters():  # nothing outside the adapters moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    return losses
