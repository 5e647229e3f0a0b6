"""D11: with two processes (gloo, CPU) the loss and the gradients equal one process on the concatenated batch, also
with the option that identical captions are not negatives (a caption shared across the two processes)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maco import MaCo, MaCoConfig

B = 3  # pairs per process


def make_batch(cfg):
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(2 * B, cfg.in_chans, cfg.input_size, cfg.input_size, generator=generator)
    input_ids = torch.randint(4, 100, (2 * B, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # one padded report
    input_ids[B + 1] = input_ids[0]  # rank 1's second pair has rank 0's first caption
    return images, input_ids, attention_mask


def make_model(mask_identical_captions=False):
    cfg = MaCoConfig.preset("tiny", text_dropout=0.0, vocab_size=100, mask_identical_captions=mask_identical_captions)
    torch.manual_seed(0)
    return cfg, MaCo(cfg)


def mask_generator(rank):
    """Rank r draws the masking noise that rows r*B..(r+1)*B of the single-process batch get (CPU rand is sequential)."""
    generator = torch.Generator().manual_seed(5)
    for _ in range(rank):
        torch.rand(B, MaCoConfig.preset("tiny").num_patches, generator=generator)
    return generator


def worker(rank, port, out_path, mask_identical_captions):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg, model = make_model(mask_identical_captions)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, input_ids, attention_mask = (t[rank * B:(rank + 1) * B] for t in make_batch(cfg))
    out = ddp(images, input_ids, attention_mask, generator=mask_generator(rank))
    out["loss"].backward()
    if rank == 0:
        torch.save({"loss_con": out["loss_con"].detach(), "loss_rec": out["loss_rec"].detach(),
                    "correlation_weights": out["correlation_weights"].detach(),
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}, out_path)
    dist.barrier()  # neither process tears the group down while the other still uses it (rank 0 hosts its store)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mask_identical_captions", [False, True])
def test_two_process_loss_and_gradients_equal_one_process_on_the_concatenated_batch(tmp_path, mask_identical_captions):
    out_path = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(free_port(), str(out_path), mask_identical_captions), nprocs=2, join=True)
    distributed = torch.load(out_path)

    cfg, model = make_model(mask_identical_captions)
    out = model(*make_batch(cfg), generator=mask_generator(0))
    out["loss"].backward()

    assert out["correlation_weights"].shape == distributed["correlation_weights"].shape == (2 * B,)  # the gathered contrastive batch
    assert torch.allclose(out["loss_con"], distributed["loss_con"], atol=1e-5)
    # each process's reconstruction loss is local; with equal masked counts their mean is the global one
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, distributed["grads"][name], atol=1e-5, rtol=1e-4), name
