"""
umT5 encoder as used by Wan2.2 as its text encoder, written out by hand.
Module names equal the official Wan2.2 checkpoint keys (wan/modules/t5.py), so
`load_state_dict` needs no renaming. Also: a toy word-level tokenizer for the
synthetic dataset, and a Tokenizer that reads it or the real umT5 tokenizer
(google/umt5-xxl/: tokenizer.json, else spiece.model).
"""
import html
import math
import os
import re

import ftfy
import torch
import torch.nn as nn
import torch.nn.functional as F

configs = {
    # the real thing: 242 tensors, 5,680,910,336 params
    'umt5-xxl': dict(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24, num_buckets=32),
    # tiny frozen random encoder for tests and the synthetic dataset
    'debug': dict(vocab=512, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, num_buckets=32),
}

# -----------------------------------------------------------------------------
# model

class T5LayerNorm(nn.Module):
    """RMS norm: no mean subtraction, no bias; variance in fp32."""
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x

class T5Attention(nn.Module):
    def __init__(self, dim, dim_attn, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x, mask, pos_bias):
        B, L, _ = x.shape
        q, k, v = (f(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        # T5 has no 1/sqrt(d) scaling: it is folded into the q init. Padded keys get the most negative value.
        bias = x.new_zeros(B, self.num_heads, L, L) + pos_bias
        bias = bias.masked_fill(mask.view(B, 1, 1, L) == 0, torch.finfo(x.dtype).min)
        att = q @ k.transpose(-2, -1) + bias
        att = F.softmax(att.float(), dim=-1).type_as(att)  # softmax in fp32 even for bf16 weights
        y = (att @ v).transpose(1, 2).reshape(B, L, -1)
        return self.o(y)

class GELU(nn.Module):
    """Tanh GELU in elementary ops, as the official Wan T5: in bf16 every intermediate is rounded,
    so nn.GELU(approximate='tanh') (one fused op) differs in many of the outputs."""
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

class T5FeedForward(nn.Module):
    """Gated GELU. `gate` is a Sequential so its checkpoint key is `gate.0.weight`."""
    def __init__(self, dim, dim_ffn):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gate(x))

class T5RelativeEmbedding(nn.Module):
    """Bidirectional bucketed relative position bias -> [1, heads, Lq, Lk]."""
    def __init__(self, num_buckets, num_heads, max_dist=128):
        super().__init__()
        self.num_buckets, self.max_dist = num_buckets, max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq, lk):
        device = self.embedding.weight.device
        rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
        return self.embedding(self.bucket(rel)).permute(2, 0, 1).unsqueeze(0).contiguous()

    def bucket(self, rel):
        n = self.num_buckets // 2  # half the buckets for keys after the query, half for before
        out = (rel > 0).long() * n
        rel = rel.abs()
        exact = n // 2  # small distances get one bucket each, larger ones log-spaced up to max_dist
        large = exact + (torch.log(rel.float() / exact) / math.log(self.max_dist / exact) * (n - exact)).long()
        large = large.clamp(max=n - 1)
        return out + torch.where(rel < exact, rel, large)

class T5Block(nn.Module):
    def __init__(self, dim, dim_attn, dim_ffn, num_heads, num_buckets):
        super().__init__()
        self.norm1 = T5LayerNorm(dim)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = T5LayerNorm(dim)
        self.ffn = T5FeedForward(dim, dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(num_buckets, num_heads)  # umT5: one per layer

    def forward(self, x, mask):
        # (the official fp16_clamp is a no-op outside fp16; Wan runs T5 in bf16, so it is left out)
        x = x + self.attn(self.norm1(x), mask, self.pos_embedding(x.size(1), x.size(1)))
        return x + self.ffn(self.norm2(x))

class T5Encoder(nn.Module):
    def __init__(self, vocab, dim, dim_attn, dim_ffn, num_heads, num_layers, num_buckets):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([T5Block(dim, dim_attn, dim_ffn, num_heads, num_buckets) for _ in range(num_layers)])
        self.norm = T5LayerNorm(dim)

    def forward(self, ids, mask):
        x = self.token_embedding(ids)  # no embedding scaling in T5
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    @torch.no_grad()
    def init_weights(self, seed=0):
        """Deterministic random init, same stds as the official init_weights (q absorbs the missing attention scale)."""
        g = torch.Generator(self.norm.weight.device).manual_seed(seed)
        normal = lambda w, std: w.normal_(0.0, std, generator=g)
        dim, dim_attn = self.token_embedding.weight.shape[1], self.blocks[0].attn.q.weight.shape[0]
        normal(self.token_embedding.weight, 1.0)
        for b in self.blocks:
            heads, dim_ffn = b.attn.num_heads, b.ffn.fc1.weight.shape[0]
            normal(b.attn.q.weight, (dim * dim_attn) ** -0.5)
            normal(b.attn.k.weight, dim ** -0.5)
            normal(b.attn.v.weight, dim ** -0.5)
            normal(b.attn.o.weight, (heads * dim_attn) ** -0.5)
            normal(b.ffn.gate[0].weight, dim ** -0.5)
            normal(b.ffn.fc1.weight, dim ** -0.5)
            normal(b.ffn.fc2.weight, dim_ffn ** -0.5)
            normal(b.pos_embedding.embedding.weight, (2 * b.pos_embedding.num_buckets * heads) ** -0.5)
        for m in self.modules():
            if isinstance(m, T5LayerNorm):
                m.weight.fill_(1.0)
        return self

def t5_config(shapes):
    """T5Encoder arguments read off {key: shape} of a state dict (the relative-bias table gives the head count)."""
    vocab, dim = shapes['token_embedding.weight']
    buckets, heads = shapes['blocks.0.pos_embedding.embedding.weight']
    return dict(vocab=vocab, dim=dim, dim_attn=shapes['blocks.0.attn.q.weight'][0],
                dim_ffn=shapes['blocks.0.ffn.fc1.weight'][0], num_heads=heads, num_buckets=buckets,
                num_layers=len({k.split('.')[1] for k in shapes if k.startswith('blocks.')}))

@torch.no_grad()  # the text encoder is frozen
def encode(model, ids, mask, text_len=512):
    """Run the encoder, keep each sample's real rows (incl. EOS), zero the rest: what the Wan DiT consumes."""
    n = int(mask.gt(0).sum(dim=1).max())
    out = model(ids[:, :n], mask[:, :n])  # the padding is masked out: running past the longest text changes nothing
    ctx = out.new_zeros(out.size(0), text_len, out.size(2))
    for i, n in enumerate(mask.gt(0).sum(dim=1).tolist()):
        ctx[i, :n] = out[i, :n]
    return ctx

# -----------------------------------------------------------------------------
# tokenizer

def clean_text(text):
    """The official 'whitespace' cleaning: ftfy.fix_text, html unescape twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r'\s+', ' ', text).strip()

def build_tokenizer(texts, path, vocab_size=512):
    """Toy lowercase word-level tokenizer with T5 specials (<pad>=0, </s>=1, <unk>=2); appends </s>; saves to path."""
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers, processors, trainers
    tok = HFTokenizer(models.WordLevel(unk_token='<unk>'))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits words and punctuation runs
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=['<pad>', '</s>', '<unk>'])
    tok.train_from_iterator([clean_text(t) for t in texts], trainer)
    tok.post_processor = processors.TemplateProcessing(single='$A </s>', special_tokens=[('</s>', 1)])
    tok.save(str(path))
    return tok

class Tokenizer:
    """umT5's tokenizer, or a toy one from build_tokenizer; returns fixed-length (ids, mask) like the official
    HuggingfaceTokenizer (padding='max_length', truncation=True, add_special_tokens=True: </s> appended and kept last).

    path: a tokenizer.json, a spiece.model, or a folder holding either (the official google/umt5-xxl/); tokenizer.json
    is preferred, as transformers' AutoTokenizer does."""
    def __init__(self, path):
        path = str(path)
        if os.path.isdir(path):
            path = next((os.path.join(path, n) for n in ('tokenizer.json', 'spiece.model')
                         if os.path.exists(os.path.join(path, n))), path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path} is no tokenizer file nor a folder holding tokenizer.json or spiece.model; '
                                    "pass one of those, e.g. the checkpoint's google/umt5-xxl folder")
        if path.endswith('.model'):
            import sentencepiece
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
            self.pad_id, self.eos_id = self.sp.pad_id(), self.sp.eos_id()  # 0 and 1 in T5 vocabularies
        else:
            from tokenizers import Tokenizer as HFTokenizer
            self.sp, self.tok = None, HFTokenizer.from_file(path)
            pad = self.tok.token_to_id('<pad>')
            self.pad_id = 0 if pad is None else pad

    def __call__(self, texts, text_len=512):
        texts = [clean_text(t) for t in texts]
        if self.sp is not None:
            rows = [self.sp.encode(t)[:text_len - 1] + [self.eos_id] for t in texts]
        else:  # the post-processor appends </s>; truncation leaves room for it
            self.tok.no_padding()
            self.tok.enable_truncation(max_length=text_len)
            rows = [e.ids for e in self.tok.encode_batch(texts)]
        ids = torch.tensor([r + [self.pad_id] * (text_len - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (text_len - len(r)) for r in rows], dtype=torch.long)
        return ids, mask

    def offsets(self, text):
        """(start, end) character offsets in clean_text(text) of its tokens before </s>, in order (phrase -> tokens)."""
        text = clean_text(text)
        if self.sp is not None:  # sentencepiece gives byte offsets
            b = text.encode()
            return [(len(b[:p.begin].decode(errors='ignore')), len(b[:p.end].decode(errors='ignore')))
                    for p in self.sp.encode(text, out_type='immutable_proto').pieces]
        self.tok.no_truncation()
        return list(self.tok.encode(text, add_special_tokens=False).offsets)
