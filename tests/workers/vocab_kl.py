"""Vocab-parallel KL at TP=2 against a gathered full-vocabulary computation, values and
gradients. usage: vocab_kl.py OUT.json"""

import json
import sys
from pathlib import Path

import torch


def reference(student, teacher, temperature, reverse, top_k=None):
    log_q = torch.log_softmax(student / temperature, -1)
    if top_k is not None:  # teacher renormalised over its k largest logits
        kth = teacher.topk(top_k, -1).values[..., -1:]
        teacher = teacher.masked_fill(teacher < kth, float("-inf"))
    log_p = torch.log_softmax(teacher / temperature, -1)
    if top_k is not None:
        p = log_p.exp()
        return (p * (log_p - log_q)).nan_to_num().sum(-1) * temperature**2
    if reverse:
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl * temperature**2


def main() -> None:
    from megatron.core import parallel_state

    from megatron_prune.distill.kl import VocabMismatchError, vocab_parallel_kl
    from megatron_prune.distributed import ParallelLayout, initialize

    initialize(ParallelLayout(tp=2), "cpu")
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    vocab, padded, shard = 19, 20, 10
    g = torch.Generator().manual_seed(0)
    full_s = torch.randn(3, 5, vocab, generator=g) * 3
    full_t = torch.randn(3, 5, vocab, generator=g) * 3
    report = {}
    cases = (("forward", 1.0, False, None), ("reverse", 1.0, True, None),
             ("forward_T2", 2.0, False, None), ("reverse_T2", 2.0, True, None),
             ("top5", 1.0, False, 5), ("top3_T2", 2.0, False, 3))  # fmt: skip
    for name, temperature, reverse, top_k in cases:
        pad = torch.zeros(3, 5, padded - vocab)
        local_s = torch.cat([full_s, pad], -1)[..., rank * shard : (rank + 1) * shard].clone()
        local_t = torch.cat([full_t, pad], -1)[..., rank * shard : (rank + 1) * shard]
        local_s.requires_grad_(True)
        kl = vocab_parallel_kl(local_s, local_t, group=group, vocab_start=rank * shard,
                               vocab_size=vocab, temperature=temperature, reverse=reverse,
                               top_k=top_k, chunk_tokens=4)  # fmt: skip
        kl.sum().backward()
        ref_s = full_s.clone().requires_grad_(True)
        ref = reference(ref_s, full_t, temperature, reverse, top_k)
        ref.sum().backward()
        ref_grad = torch.cat([ref_s.grad, pad], -1)[..., rank * shard : (rank + 1) * shard]
        report[name] = {
            "value_diff": float((kl - ref).abs().max()),
            "grad_diff": float((local_s.grad - ref_grad).abs().max()),
            "grad_scale": float(ref_grad.abs().max()),
        }
    # LM cross-entropy (the optional mix): against torch's on the whole, unpadded logits
    from megatron_prune.distill.kl import vocab_parallel_cross_entropy

    labels = torch.randint(0, vocab, (3, 5), generator=g)
    pad = torch.zeros(3, 5, padded - vocab)
    local_s = torch.cat([full_s, pad], -1)[..., rank * shard : (rank + 1) * shard].clone()
    local_s.requires_grad_(True)
    ce = vocab_parallel_cross_entropy(local_s, labels, group=group, vocab_start=rank * shard,
                                      vocab_size=vocab, chunk_tokens=4)  # fmt: skip
    ce.sum().backward()
    ref_s = full_s.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_s.reshape(-1, vocab), labels.reshape(-1),
                                            reduction="none").reshape(3, 5)  # fmt: skip
    ref.sum().backward()
    ref_grad = torch.cat([ref_s.grad, pad], -1)[..., rank * shard : (rank + 1) * shard]
    report["ce"] = {
        "value_diff": float((ce - ref).abs().max()),
        "grad_diff": float((local_s.grad - ref_grad).abs().max()),
        "grad_scale": float(ref_grad.abs().max()),
    }
    same = torch.randn(4, shard, generator=g).requires_grad_(True)
    kl = vocab_parallel_kl(
        same, same.detach(), group=group, vocab_start=rank * shard, vocab_size=vocab
    )
    kl.sum().backward()
    report["equal_loss"] = float(kl.abs().max())
    report["equal_grad"] = float(same.grad.abs().max())
    try:
        vocab_parallel_kl(same, torch.zeros(4, shard + 1), group=group)
        report["mismatch_refused"] = False
    except VocabMismatchError:
        report["mismatch_refused"] = True
    if torch.distributed.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
