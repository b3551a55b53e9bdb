"""Device mesh, FSDP2 sharding and Ulysses sequence parallelism, kept apart from the model definitions.

One code path for every world size: `python train_dit.py` runs in a 1-rank process group, `torchrun` in a 2-D mesh
("dp", "sp"). Parameters are sharded with FSDP2 over all ranks; the sp ranks of a dp group see the same clips and
each holds a contiguous shard of the tokens. The model calls the collectives below with its `group` argument
(None: no sequence parallelism, every collective is the identity).

Gradient convention under sp: every sp rank's loss is a share L_r of the group's loss (sum_r L_r = L) and the
gathers' backward is a sum reduce-scatter, so a rank's local tokens receive the gradient of L. Parameters used on
every rank (embeddings, modulation) then get the contribution of the local tokens only; FSDP averages over all
dp * sp ranks, so the trainer scales each rank's loss by sp to turn that average into sum over sp, mean over dp.
"""
import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def init(sp=1, device='auto', heads=None):
    """Join torchrun's process group (or make a 1-rank one for plain python) and build the ("dp", "sp") mesh.
    Returns (mesh, device). Layouts that cannot work are refused before any process group exists."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (('WORLD_SIZE', 1), ('RANK', 0), ('LOCAL_RANK', 0)))
    if sp < 1 or world % sp:
        raise SystemExit(f'sp={sp} does not divide the world size {world}: use an sp that divides the number of '
                         f'processes (data parallel size = world / sp)')
    if heads is not None and heads % sp:
        raise SystemExit(f'sp={sp} does not divide the {heads} attention heads of this DiT: Ulysses gives each sp '
                         f'rank heads/sp heads (pick sp among {[d for d in range(1, heads + 1) if heads % d == 0]})')
    dev = pick_device(device, local)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        if 'WORLD_SIZE' in os.environ:
            # NCCL told its device up front: no guessing from the rank, no hang on the first collective
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                    **({'device_id': dev} if dev.type == 'cuda' else {}))
        else:  # plain python: the same code in a 1-rank group, no port needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(dev.type, (world // sp, sp), mesh_dim_names=('dp', 'sp'))
    return mesh, dev


def pick_device(device='auto', local=0):
    """auto = cuda when available, else cpu; 'cuda' means this process's GPU: cuda:LOCAL_RANK under torchrun, or the
    one GPU a scheduler's per-task CUDA_VISIBLE_DEVICES leaves visible."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device != 'cuda':
        return torch.device(device)
    n = torch.cuda.device_count()
    if n != 1 and local >= n:
        raise SystemExit(f'LOCAL_RANK {local} has no GPU of its own ({n} visible): start at most {n} processes per '
                         f'node, or one per GPU with CUDA_VISIBLE_DEVICES set per task')
    return torch.device('cuda', 0 if n == 1 else local)


def close():
    """Tear down: the barrier keeps rank-0-only work at the end from making gloo abort the others at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sp_group(mesh):
    """The sequence-parallel process group, or None when sp = 1 (the collectives are skipped)."""
    return mesh['sp'].get_group() if mesh['sp'].size() > 1 else None


def shard(module, mesh, blocks=(), group=None):
    """FSDP2 over all dp x sp ranks (or the ranks of group): each block its own unit (gathered just before use, freed
    after), then the root."""
    world = DeviceMesh.from_group(group or dist.group.WORLD, mesh.device_type)
    for block in blocks:
        fully_shard(block, mesh=world)
    return fully_shard(module, mesh=world)


def shard_frozen(module, mesh, blocks=(), group=None):
    """shard() for a model that only runs under no_grad: FSDP2 keeps a root unit's weights gathered after its forward
    (it expects the backward), so here the root reshards itself after every forward."""
    module = shard(module, mesh, blocks, group)
    module.register_forward_hook(lambda m, args, out: m.reshard())
    return module


def is_sharded(module):
    """Whether FSDP2 shards the module's parameters (they then stay on their device)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def copy_full(param, full):
    """Copy a full tensor into a parameter or buffer that may be an FSDP shard (a DTensor): each rank keeps its slice."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)  # every rank holds full: slice locally, no communication
        param.to_local().copy_(full.to_local())
    else:
        param.copy_(full)


# ---------------------------------------------------------------------------------------------- sequence parallelism

def pad_len(n, group):
    sp = 1 if group is None else group.size()
    return -(-n // sp) * sp


def seq_shard(x, group, dim=1):
    """This rank's contiguous chunk of x along dim, padded with zeros to a multiple of sp. Its backward zero-fills
    the other chunks: parameters computed on every rank get only their local tokens' gradient."""
    if group is None:
        return x
    n = x.shape[dim]
    x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad_len(n, group) - n, *x.shape[dim + 1:])], dim)
    return x.chunk(group.size(), dim)[group.rank()]


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous: torch 2.11's collectives refuse a strided one."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def seq_gather(x, group, n, dim=1):
    """All sp ranks' chunks joined along dim and the padding cut to n; backward: sum reduce-scatter."""
    if group is None:
        return x
    x = funcol.all_gather_tensor_autograd(x.movedim(dim, 0).contiguous(), 0, group)  # torch 2.11 has this one too
    return _ContiguousGrad.apply(funcol.wait_tensor(x)).movedim(0, dim).narrow(dim, 0, n)


def _all_to_all(x, group):
    """Chunk i of dim 0 goes to rank i; the chunk from rank j lands at j. Autograd: the backward is the same swap."""
    x = funcol.all_to_all_single_autograd(x.contiguous(), None, None, group)
    return _ContiguousGrad.apply(funcol.wait_tensor(x))


def seq_to_heads(x, group):
    """Ulysses: [B, L/sp, heads, d] (local tokens, all heads) -> [B, L, heads/sp, d] (all tokens, local heads)."""
    if group is None:
        return x
    sp, (B, n, h, d) = group.size(), x.shape
    x = _all_to_all(x.view(B, n, sp, h // sp, d).permute(2, 0, 1, 3, 4), group)  # [sp(src), B, n, h/sp, d]
    return x.permute(1, 0, 2, 3, 4).reshape(B, sp * n, h // sp, d)


def qkv_to_heads(q, k, v, group):
    """seq_to_heads of q, k and v in one all-to-all, in autocast's dtype when it is on (the attention casts them to
    it anyway, so the numbers are the same at half the bytes)."""
    if group is None:
        return q, k, v
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    x = seq_to_heads(torch.stack([q, k, v], dim=3).flatten(3), group)  # [B, L, heads/sp, 3 d]
    return x.unflatten(3, (3, -1)).unbind(3)


def heads_to_seq(x, group):
    """The inverse of seq_to_heads: [B, L, heads/sp, d] -> [B, L/sp, heads, d]."""
    if group is None:
        return x
    sp, (B, L, h, d) = group.size(), x.shape
    x = _all_to_all(x.view(B, sp, L // sp, h, d).transpose(0, 1), group)  # [sp(src heads), B, L/sp, h, d]
    return x.permute(1, 2, 0, 3, 4).reshape(B, L // sp, sp * h, d)
