"""mlsm.py -- Masked Latent Semantic Modeling (MLSM) in one readable file.

Masked language modeling (MLM) trains an encoder to name each hidden token. MLSM (Berend 2023) trains a
student to predict, at each masked position, a distribution over K latent concepts read off a teacher:
  x = (h - mu) / ||h - mu||                          the teacher's state h there (unmasked input), centred, unit norm
  a = argmin_{a >= 0} 1/2 ||x - a D||^2 + lam ||a||_1   its non-negative sparse code over a dictionary D (K x C)
  p = a / ||a||_1                                     the code as a distribution over the K concepts
  L = 1/M sum_m KL(p_m || softmax(z_m))              the student's loss, z_m its concept logits at masked position m
Then (Berend 2024) the student is frozen and only a linear layer from its concept logits to the vocabulary is
trained, with MLM: how much of a token the concepts carry.

Stages (each saves its output under --out; a re-run skips finished stages and resumes training):
  1. tokenizer   byte-level BPE trained on the corpus                  -> tokenizer.json
  2. data        token ids packed into [CLS] ... [SEP] rows            -> train_ids.npy, dev_ids.npy
  3. teacher     a BERT-style encoder trained with masked LM           -> teacher.pt
  4. concepts    a non-negative sparse dictionary over teacher states  -> dictionary.npz
  5. student     MLSM: predict the teacher's concept distribution      -> student.pt
  6. head        frozen student + linear layer concepts -> tokens      -> head.pt
     baseline    a student-sized encoder trained with plain MLM        -> baseline.pt
  7. report      curves, dev MLM loss, BLiMP, fine-tuning, concepts  -> results.json, concepts.json

Reading guide. The method is in the first half: Config, the Model, then "MLSM": states -> codes (a one-state
solver to read, then the batched one) -> concept distributions -> KL -> masking, batches and the student's step
-> the frozen head. "Training", "Stages", the original's mode without a teacher (--teacher self), "Evaluation"
and run() show how it is trained and judged. Everything after run() -- files, the BPE tokenizer, corpus reading,
downloads, the command line, devices, the benchmark -- is machinery a reader of the method can skip. A concept is
an atom of the dictionary: a direction in the teacher's state space. README.md has a map of the file and the
measured numbers.

Papers (G. Berend): Masked Latent Semantic Modeling: an Efficient Pre-training Alternative to Masked Language
Modeling (Findings of ACL 2023); Better Together: Jointly Using MLSM and MLM for Sample Efficient Pre-training
(BabyLM 2023); Integrating Quasi-symbolic Conceptual Knowledge into Language Model Pre-training (BabyLM 2024).

Run (times per stage are in README.md):
  python mlsm.py --preset toy         # a generated language with known word classes: the whole pipeline, ~1 min
  python mlsm.py                      # laptop GPU, BabyLM strict-small (10M words, downloaded), ~50 min (estimate)
  python mlsm.py --preset cpu         # a CPU: 3M words of the same corpus, about 40 minutes on 2 cores
  torchrun --standalone --nproc_per_node=4 mlsm.py   # the same run on 4 GPUs
  python mlsm.py --bench --preset cpu # speed of every stage on this machine -> bench.json
  python mlsm.py --handout DIR        # a student copy with the exercises left to write (README: Exercises)

Deliberately left out: 80/10/10 masking, whole-word masking, sentence-level objectives, Hugging Face export.
"""

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import heapq
import http.client
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import urllib.request
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# Letters used in shape comments:
#   B batch rows, T tokens per row, C model width, H heads, V vocabulary, K concepts, m masked positions per
#   row, M masked positions in a batch, N rows of a matrix (states, codes, sentences), n states a sparse coder
#   still works on, s slots (atoms a sparse code may use).


# === Configuration: one dataclass; the command line is generated from its fields (parse_config) ===================
def option(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})

@dataclass
class Config:
    # the method: concepts, their targets and the student's loss
    n_concepts: int = option(2048, "dictionary atoms K (the original: 3000 for 768-dim BERT-base)")
    lam: float = option(0.05, "L1 penalty lambda of the sparse codes")
    center: bool = option(True, "subtract the mean teacher state before L2 normalisation (not in the original)")
    teacher_layer: int = option(-1, "teacher block whose output is sparse-coded: 1..n_layers, or -1 for the last")
    dict_tokens: int = option(50_000, "teacher states the dictionary is learned from (the original: ~1M)")
    dict_epochs: int = option(1, "passes of MiniBatchDictionaryLearning over those states")
    dict_jobs: int = option(-1, "processes coding each minibatch of dictionary learning (-1: every core)")
    coder: str = option("exact", "sparse coder: exact (active set; a code unfinished after --coder_rounds gives no "
                        "target), fista (the original's 100 FISTA steps, every code a target) or reference "
                        "(active_set_one, one state at a time: slow, for the toy preset)",
                        ["exact", "fista", "reference"])
    coder_rounds: int = option(80, "rounds of the exact sparse coder, each adding at most one atom to a code")
    mlm_weight: float = option(0.0, "add mlm_weight * token cross-entropy to the MLSM loss (BabyLM 2023: 1.0)")
    targets: str = option("concepts", "what the student predicts at masked positions: the teacher's concepts (MLSM) or "
                          "its token distribution (tokens: plain distillation, the control)", ["concepts", "tokens"])
    # the original's second mode: no auxiliary model
    teacher: str = option("separate", "where the concepts come from: separate (a teacher trained with MLM first) "
                          "or self (the student's own states: the original's mode without an auxiliary model)",
                          ["separate", "self"])
    self_every: float = option(0.2, "--teacher self: share of the student's steps of plain MLM before its first "
                               "dictionary, and between re-learnt ones (the original: 10,000 of 100,000 updates)")
    # encoder (teacher, student and MLM baseline are the same size)
    d_model: int = option(512, "model width")
    n_layers: int = option(8, "transformer blocks")
    n_heads: int = option(8, "attention heads")
    dropout: float = option(0.1, "dropout in the encoder")
    # training: AdamW, warmup and linear decay, clipping as in the original; lr, warmup, beta2 and masking
    # from the recipe search in README.md (the original, for BERT-base: lr 1e-4, 1% warmup, beta2 0.999, 15%)
    batch_size: int = option(64, "rows per training step (in all: torchrun's processes share them)")
    micro_batch: int = option(0, "rows per forward and backward pass: each step's rows in chunks of this many, "
                              "the gradients summed (the same training in less memory, for small GPUs); 0: all at once")
    lr: float = option(1e-3, "peak learning rate of teacher, student and MLM baseline")
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases, LayerNorms and embeddings)")
    beta2: float = option(0.98, "AdamW beta2")
    warmup: float = option(0.06, "share of steps with linear warmup")
    clip: float = option(1.0, "gradient-norm clipping")
    mask_rate: float = option(0.4, "share of tokens replaced by [MASK] in training (dev numbers always mask 15%)")
    teacher_steps: int = option(5000, "teacher MLM training steps")
    student_steps: int = option(4000, "MLSM student (and MLM baseline) training steps")
    head_steps: int = option(2000, "frozen-backbone token head training steps")
    head_lr: float = option(1e-4, "peak learning rate of the token head (README: the head's learning rate)")
    baseline: bool = option(True, "also train an MLM student: same size, batches, masks, steps, schedule, seed")
    # tokenizer and data
    data: str = option("data/babylm_10M", "folder of *.train / *.txt files (*.dev or a dev/ folder: dev split) or "
                       "one text file; the default is downloaded when missing (--preset toy: generated)")
    vocab_size: int = option(8192, "BPE vocabulary size, special tokens and 256 bytes included")
    seq_len: int = option(128, "tokens per training row, [CLS] and [SEP] included")
    train_words: int = option(0, "train on about this many words, the first part of each file (0: all)")
    dev_fraction: float = option(0.02, "share of each file held out as dev when the corpus has no dev files")
    # evaluation and logging
    eval_rows: int = option(512, "dev rows used for the dev MLM loss and accuracy")
    blimp: str = option("data/blimp", "folder of BLiMP *.jsonl minimal pairs, downloaded when missing; '' skips")
    blimp_pairs: int = option(0, "BLiMP pairs per paradigm scored at the end: the first N of each (0: all)")
    supplement: str = option("", "folder of BabyLM supplement *.jsonl minimal pairs, scored when given")
    finetune: str = option("data/glue", "folder of <task>.train.jsonl / <task>.valid.jsonl (BabyLM's GLUE format) "
                           "to fine-tune on, downloaded when missing; '' skips")
    tasks: str = option("", "comma-separated tasks of --finetune to fine-tune on ('': all; the default folder gets "
                        "all seven of BabyLM's)")
    finetune_steps: int = option(300, "fine-tuning steps per task, model and seed")
    finetune_lr: float = option(1e-4, "peak learning rate of fine-tuning")
    finetune_seeds: int = option(2, "fine-tuning runs per task and model, with different seeds")
    pll: str = option("word_l2r", "minimal-pair scorer: word_l2r (Kauf & Ivanova 2023) or original (Salazar 2020)",
                      ["word_l2r", "original"])
    curve_points: int = option(12, "dev evaluations along each training run, for the learning curves")
    curve_pairs: int = option(0, "BLiMP pairs per paradigm scored at each curve point (0: none)")
    log_every: int = option(50, "steps between loss readouts (a readout waits for the device)")
    ckpt_every: int = option(500, "steps between resumable checkpoints")
    # the run
    preset: str = option("laptop", "laptop (GPU, 10M words, ~50 min), cpu (3M words, ~40 min on 2 cores), toy (a "
                         "generated language with known word classes, ~1 min), tiny (smoke)",
                         ["laptop", "cpu", "toy", "tiny"])
    out: str = option("", "run directory for every artifact; empty: runs/<preset>")
    fresh: bool = option(False, "delete this run's artifacts in --out and start again")
    seed: int = option(0, "seed for initialisation, batches and masks")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, mps")
    compile: bool = option(False, "torch.compile the encoders (checkpoints stay uncompiled)")
    dtype: str = option("auto", "autocast of training steps: auto (CUDA: bf16 where the GPU has it, else fp16 with "
                        "gradient scaling; fp32 elsewhere), bf16, fp16 or fp32", ["auto", "bf16", "fp16", "fp32"])
    bench: bool = option(False, "measure the speed of every stage instead of training -> bench.json in --out")
    handout: str = option("", "write a student's folder: mlsm.py with the exercises left to write, their checks, "
                          "the sheet EXERCISES.md")
    exercises: str = option("", "--handout: comma-separated exercises to leave out, by number or name, or week1 / "
                            "week2 ('': all): 1 normalise_states, 2 active_set_one, 3 fista, 4 code_distribution, "
                            "5 concept_kl, 6 mask_tokens, 7 student_loss, 8 make_head (week 1); 9 SparseCoder, "
                            "10 pseudo_log_likelihoods, 11 TokenTargets (week 2)")
    grade: str = option("", "check students' copies (each a mlsm.py or a folder holding one; comma-separated, globs "
                        "allowed) against every exercise: one row a student")

# Presets change only numbers (sizes, steps, learning rates); any field can still be set on the command line.
TINY = dict(vocab_size=512, seq_len=32, d_model=64, n_layers=2, n_heads=2, dropout=0.0, batch_size=64, lr=1e-3,
            mask_rate=0.15, teacher_steps=100, student_steps=100, head_steps=100, head_lr=1e-2, n_concepts=64,
            dict_tokens=4000, dict_jobs=1, eval_rows=64, log_every=10, ckpt_every=50, blimp="", finetune="")
PRESETS = {
    "laptop": {},
    # Rows of 32 tokens, batches of 64 rows, lr 2e-3 and a narrow model that takes many steps: the best of the
    # README's recipe search at equal time on a CPU; a short head learns more at a higher head_lr.
    "cpu": dict(train_words=3_000_000, seq_len=32, d_model=192, n_layers=4, n_heads=4, dropout=0.0, batch_size=64,
                lr=2e-3, teacher_steps=1700, student_steps=1700, head_steps=800, head_lr=3e-4, n_concepts=1024,
                dict_tokens=24_000, dict_jobs=1, eval_rows=1024, ckpt_every=100, blimp_pairs=50, curve_points=10,
                curve_pairs=4, tasks="mrpc,rte", finetune_steps=100),
    # The tiny model on a generated language whose word classes are known (Machinery: the toy language).
    "toy": dict(TINY, data="data/toy", blimp="data/toy/pairs", n_concepts=32, teacher_steps=1600, student_steps=400,
                head_steps=300),
    # Seconds, for smoke runs and tests.
    "tiny": TINY,
}

# Fields that do not change any artifact, so a run directory may be reused when only they differ.
RUN_ONLY = set("out fresh device dtype micro_batch compile bench handout exercises grade log_every ckpt_every blimp "
               "supplement finetune tasks finetune_steps finetune_lr finetune_seeds".split())

class UserError(Exception):
    """A problem the user can fix; main() prints it as one line, without a traceback."""

# === The model: a pre-LayerNorm bidirectional transformer encoder (BERT-style) ====================================
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
PAD, CLS, SEP, MASK = range(4)
N_SPECIAL = len(SPECIALS)  # byte b has id N_SPECIAL + b; merged tokens follow from N_SPECIAL + 256

def at(x, pos):
    """x (B, T, ...) at positions pos (B, m) of each row -> (B m, ...), row by row."""
    return x[torch.arange(len(x), device=x.device)[:, None], pos].flatten(0, 1)

class SelfAttention(nn.Module):
    def __init__(self, C, H, dropout):
        super().__init__()
        self.H, self.dropout = H, dropout
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)

    def forward(self, x, keep=None, pos=None):
        """x (B, T, C); keep (B, T) True for real tokens, False for padding, or None (no padding);
        pos (B, m) positions or None -> outputs at every position (B, T, C), or at pos only (B m, C)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)  # 3x (B, H, T, C/H)
        mask = None if keep is None else keep[:, None, None, :]  # (B, 1, 1, T): which keys to attend to
        # softmax(q k^T / sqrt(C/H) + mask) v; fused kernels (flash / memory-efficient) on GPU
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, C/H)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y if pos is None else at(y, pos))

class Block(nn.Module):
    def __init__(self, C, H, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = SelfAttention(C, H, dropout)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C), nn.Dropout(dropout))

    def forward(self, x, keep=None, pos=None):
        """(B, T, C) -> (B, T, C), or (B m, C) at positions pos (B, m) only. Pre-LN: each sub-layer's
        input is normalised, the residual stream is not."""
        x = (x if pos is None else at(x, pos)) + self.attn(self.ln1(x), keep, pos)
        return x + self.mlp(self.ln2(x))

class Encoder(nn.Module):
    """Token + position embeddings, n_layers blocks, a final LayerNorm, and two heads: a token head tied to
    the input embeddings (MLM), and a concept head over K concepts (MLSM, when n_concepts > 0)."""

    def __init__(self, vocab_size, seq_len, d_model, n_layers, n_heads, dropout=0.0, n_concepts=0):
        super().__init__()
        C = d_model
        self.tok_emb = nn.Embedding(vocab_size, C)
        self.pos_emb = nn.Embedding(seq_len, C)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(C, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(C)
        self.mlm_transform = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.LayerNorm(C))
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.concept_head = None
        self.apply(self._init)
        # subtle: the concept head draws from the random stream last, so a student and an MLM baseline built
        # from the same seed start from identical weights in every parameter they share
        if n_concepts:
            self.concept_head = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.LayerNorm(C), nn.Linear(C, n_concepts))
            self.concept_head.apply(self._init)

    @staticmethod
    def _init(m):  # BERT's initialisation
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids, keep=None, layer=None, pos=None):
        """ids (B, T) -> hidden states (B, T, C) after `layer` blocks (default: all, then ln_f); with pos
        (B, m), only the states at those positions (B m, C), row by row. Why pos: the losses need masked
        positions only, so the last block's projection and MLP run there alone. Positions, not a boolean
        mask: a mask's count is data, which a GPU would have to stop and report to size the output."""
        B, T = ids.shape
        x = self.drop(self.tok_emb(ids) + self.pos_emb(torch.arange(T, device=ids.device)))  # (B, T, C)
        layer = len(self.blocks) if layer in (None, -1) else layer
        for i, block in enumerate(self.blocks[:layer]):
            x = block(x, keep, pos if i == layer - 1 else None)
        return self.ln_f(x) if layer == len(self.blocks) else x

    def mlm_logits(self, h):
        """h (M, C) -> token logits (M, V). subtle: the output matrix *is* tok_emb.weight (tied)."""
        return self.mlm_transform(h) @ self.tok_emb.weight.T + self.mlm_bias

    def concept_logits(self, h):
        """h (M, C) -> concept logits (M, K)."""
        return self.concept_head(h)

def build_encoder(cfg, vocab_size, n_concepts=0):
    torch.manual_seed(cfg.seed)  # every encoder starts from the same initial weights
    return Encoder(vocab_size, cfg.seq_len, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.dropout, n_concepts)

# A token scorer is how every model that predicts tokens is measured (teacher, MLM baseline, student + head,
# unigram): token_logits(ids (B, T), keep (B, T) bool or None: False at padding, pos (B, m)) -> logits (B m, V).
def mlm_scorer(model):
    """An MLM encoder as a token scorer."""
    return lambda ids, keep, pos: model.mlm_logits(model(ids, keep, pos=pos))

# === MLSM, step by step: states -> codes -> concept distributions -> KL -> the student -> the frozen head =========
# Exercises (README: Exercises): the bodies between "BEGIN EXERCISE n" and "END EXERCISE n" are what
# `--handout` leaves for a student to write.
# --- 1. The teacher's states, centred and unit-norm ---------------------------------------------------------------
def normalise_states(h, mean):
    """States h (N, C) -> x = (h - mean) / ||h - mean||, rows of unit L2 norm (mean: zeros when not centring).
    Why centre (the original does not): contextual states point almost all the same way, so uncentred, one
    direction dominates every code and the sparse problems are badly conditioned."""
    # BEGIN EXERCISE 1: centre and normalise the states
    return F.normalize(h - mean, dim=-1)
    # END EXERCISE 1

@torch.no_grad()
def teacher_states(teacher, rows, cfg, n_tokens, device, seed):
    """Hidden states of `teacher_layer` for about n_tokens non-special tokens of random rows, unmasked
    input. -> (states (N, C) float32, token ids (N,)), on the CPU."""
    n_rows = min(len(rows), math.ceil(n_tokens / (cfg.seq_len - 2)))
    idx = np.sort(np.random.default_rng(seed).choice(len(rows), n_rows, replace=False))
    states, tokens = [], []
    for i in range(0, n_rows, cfg.batch_size):
        ids = torch.from_numpy(rows[idx[i:i + cfg.batch_size]].astype(np.int64)).to(device)  # (B, T)
        h = teacher(ids, layer=cfg.teacher_layer)[:, 1:-1]  # (B, T-2, C): drop [CLS] and [SEP]
        states.append(h.float().reshape(-1, h.shape[-1]).cpu())
        tokens.append(ids[:, 1:-1].reshape(-1).cpu())
    return torch.cat(states)[:n_tokens], torch.cat(tokens)[:n_tokens]

# --- 2. The dictionary --------------------------------------------------------------------------------------------
def learn_dictionary(H, cfg, init=None):
    """States H (N, C) -> (dictionary D (K, C) with unit-norm rows, the mean state (C,)), learned from the states
    centred by that mean (zeros without --center) and normalised; init: a dictionary to start from.
    Objective (scikit-learn's; the original's SPAMS trainDL minimises the same), over codes A >= 0 and D:
        min 1/N sum_n 0.5 ||x_n - a_n D||^2 + lam ||a_n||_1,   ||d_k|| <= 1.
    subtle: the states stay float32, as scikit-learn keeps them (float64 would double the memory)."""
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.exceptions import ConvergenceWarning

    dl = MiniBatchDictionaryLearning(n_components=cfg.n_concepts, alpha=cfg.lam, positive_code=True,
                                     fit_algorithm="cd", batch_size=256, max_iter=cfg.dict_epochs,
                                     random_state=cfg.seed, n_jobs=cfg.dict_jobs,
                                     dict_init=None if init is None else init.numpy())
    mean = H.mean(0) if cfg.center else torch.zeros(H.shape[1])  # (C,)
    with warnings.catch_warnings():  # the inner lasso of a mini-batch may stop early: harmless for the
        warnings.simplefilter("ignore", ConvergenceWarning)  # dictionary: the codes we use come from --coder,
        dl.fit(normalise_states(H, mean).numpy())  # and the report shows how well they reconstruct the states
    return F.normalize(torch.from_numpy(dl.components_).float(), dim=-1), mean  # (K, C), (C,)

# --- 3. The codes -------------------------------------------------------------------------------------------------
# For a >= 0, lam ||a||_1 = lam sum_k a_k is linear in a, so the non-negative lasso
#     a*(x) = argmin_{a >= 0} 0.5 ||x - a D||^2 + lam ||a||_1
#           = argmin_{a >= 0} 0.5 a G a^T - b a^T,     G = D D^T (K, K),  b = x D^T - lam (K,)
# is a non-negative least-squares problem, whose optimum is certified by the KKT conditions on the negative
# gradient w = b - a G:  w_k <= 0 where a_k = 0, and w_k = 0 where a_k > 0. Two ways to solve it: the
# active-set method of Lawson & Hanson (exact; mlsm.py's), and the original's FISTA (fast, approximate).
def active_set_one(x, D, lam, tol=1e-6):
    """The exact code of one state x (C,) against D (K, C), written for reading: Lawson & Hanson's
    active-set method for the non-negative least squares above. -> a (K,) >= 0.

    S is the support, the atoms allowed to be non-zero. Two moves:
      add:  the atom outside S along which the objective falls fastest (largest w = -gradient);
      drop: when the minimiser z on the new S has a coefficient <= 0, step from a towards z only as
            far as every coefficient stays >= 0, and drop the atoms that reached 0.
    It stops when no atom outside S would lower the objective: the KKT conditions hold, a is optimal."""
    # BEGIN EXERCISE 2: the one-state active-set coder
    G, b = D @ D.T, D @ x - lam  # (K, K), (K,): the quadratic and the linear term
    a, S = torch.zeros(len(D), dtype=x.dtype), []
    while len(S) < len(D):
        w = b - G @ a  # (K,): the negative gradient
        w[S] = -math.inf
        k = int(w.argmax())
        if w[k] <= tol:  # KKT: no atom outside S can lower the objective (on S the gradient is 0)
            return a
        S.append(k)
        while True:
            z = torch.zeros_like(a)
            z[S] = torch.linalg.solve(G[S][:, S], b[S])  # the minimiser with support S
            if (z[S] > 0).all():
                a = z
                break
            ratio = {j: a[j] / (a[j] - z[j]) for j in S if z[j] <= 0}  # how far a may move towards z
            t = min(ratio.values())
            a = a + t * (z - a)
            S = [j for j in S if ratio.get(j, math.inf) > t]
            a[[j for j in ratio if j not in S]] = 0
    return a
    # END EXERCISE 2

def fista(X, D, lam, iters=100, L=None):
    """The original's coder: `iters` steps of non-negative FISTA (Beck & Teboulle 2009). X (N, C), D (K, C)
    -> codes A (N, K) >= 0. Each step is a gradient step of length 1/L (L: the largest eigenvalue of G) from a
    point extrapolated along the last move, then the projection onto a >= 0. Near-parallel atoms make L large
    and the steps short, so a fixed number of steps can stop short of the optimum."""
    # BEGIN EXERCISE 3: FISTA
    G = D @ D.T  # (K, K)
    L = torch.linalg.eigvalsh(G.double()).max().to(G.dtype) if L is None else L
    b = X @ D.T - lam  # (N, K): the linear term
    A = Y = torch.zeros(len(X), len(D), dtype=X.dtype, device=X.device)  # (N, K) each
    t = 1.0
    for _ in range(iters):
        A_next = (Y + (b - Y @ G) / L).clamp(min=0)  # the gradient of the objective is a G - b
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        Y = A_next + (t - 1) / t_next * (A_next - A)
        A, t = A_next, t_next
    return A
    # END EXERCISE 3

class SparseCoder:
    """The fast version of active_set_one: the same two moves, for a batch of states at once, in torch.

    One round is one pass of active_set_one's inner loop for every state: solve G_SS z = b_S on the support S;
    where z has a coefficient <= 0, the drop move (a partial step towards z, atoms leaving S); where z is
    feasible (a = z, optimal on S), the outer loop's add move (the atom with the largest w joins S), or, where
    no atom would lower the objective, the end: that code is done.

    Gram space: with b = x D^T - lam computed once per state and G = D D^T once per dictionary, the negative
    gradient w = b - a G at a code a with support S is a sum of |S| rows of G (an embedding_bag), never a
    product with D. The small systems are solved in float32 with one step of iterative refinement, so a consumer
    GPU runs them at its fp32 rate.

    Bookkeeping, kept out of the moves' way: each state keeps its support in `slots` (one more each round, as a
    round adds at most one atom). Every round is the same batched work, so a GPU runs all `rounds` without
    waiting to be told which codes are done; on the CPU done states leave (`shrink`). On Apple's MPS, where this
    batched LU has not been tried, the small systems go to the CPU (`host_solve`).

    subtle: learned dictionaries hold near-duplicate atoms, which make G_SS badly conditioned; the
    refinement step recovers the digits that float32 elimination loses (tested against float64)."""
    exact = True  # codes are optimal, or flagged unsolved

    def __init__(self, D, lam, rounds=Config.coder_rounds, slots=None, shrink=None, host_solve=None, tol=1e-6):
        self.D, self.lam, self.rounds, self.slots, self.tol = D, lam, rounds, slots or rounds, tol  # D (K, C)
        self.shrink = D.device.type == "cpu" if shrink is None else shrink
        self.host_solve = D.device.type == "mps" if host_solve is None else host_solve
        with full_fp32_matmuls():  # (Machinery: devices)
            self.G = D @ D.T  # (K, K)

    def solve(self, G_S, b_S):
        """Batched small systems G_S (n, s, s) z = b_S (n, s) -> z (n, s): LU in float32, then one step of
        iterative refinement, z += G_S^-1 (b_S - G_S z)."""
        dev = b_S.device
        if self.host_solve:
            G_S, b_S = G_S.cpu(), b_S.cpu()
        LU, pivots, _ = torch.linalg.lu_factor_ex(G_S)
        z = torch.linalg.lu_solve(LU, pivots, b_S.unsqueeze(-1))  # (n, s, 1)
        z = z + torch.linalg.lu_solve(LU, pivots, b_S.unsqueeze(-1) - G_S @ z)
        return z.squeeze(-1).to(dev)

    @torch.no_grad()
    def encode(self, X):
        """X (N, C) float32 -> codes A (N, K) >= 0, and solved (N,) bool: False where `rounds` rounds or
        `slots` atoms were not enough (that code is feasible but not optimal)."""
        with full_fp32_matmuls():  # (Machinery: devices) TF32 or bf16 products are too coarse for the KKT test
            G, K, dev, N = self.G, len(self.D), X.device, len(X)
            A, solved = torch.zeros(N, K, device=dev), torch.zeros(N, dtype=torch.bool, device=dev)
            live = torch.arange(N, device=dev)  # (n,) the states still worked on
            b = X @ self.D.T - self.lam  # (n, K): the linear term of each state
            atom = torch.zeros(N, 0, dtype=torch.long, device=dev)  # (n, s) the atom in each slot
            in_S = torch.zeros(N, 0, dtype=torch.bool, device=dev)  # (n, s) slot holds an atom of S
            a = torch.zeros(N, 0, device=dev)  # (n, s) coefficient in each slot
            G_SS = torch.zeros(N, 0, 0, device=dev)  # (n, s, s) G between the slots' atoms, kept up to date
            for _ in range(self.rounds):
                if atom.shape[1] < self.slots:  # bookkeeping: one more slot, as a round adds at most one atom
                    atom, in_S, a = (torch.cat([t, t.new_zeros(len(t), 1)], 1) for t in (atom, in_S, a))
                    G_SS = F.pad(G_SS, (0, 1, 0, 1))
                s = atom.shape[1]
                # z: the minimiser on S, G_SS z = b_S (free slots solve z = 0)
                both = in_S.unsqueeze(2) & in_S.unsqueeze(1)  # (n, s, s)
                z = self.solve(torch.where(both, G_SS, torch.eye(s, device=dev)),
                               torch.where(in_S, b.gather(1, atom), 0))  # (n, s)
                # BEGIN EXERCISE 9: the two moves, for every state at once
                # drop: a moves towards z by t, the largest move that keeps every coefficient >= 0
                bad = in_S & (z <= 0)  # (n, s)
                ratio = torch.where(bad, a / (a - z), math.inf)
                t = ratio.min(1, keepdim=True).values.clamp(max=1)  # (n, 1); 1 where none is bad: a = z
                in_S = in_S & ~(bad & (ratio <= t))
                a = torch.where(in_S, a + t * (z - a), 0)
                # add: the atom outside S with the largest w = b - a G (free slots add 0 rows of G)
                aG = F.embedding_bag(atom, G, per_sample_weights=a, mode="sum")  # (n, K)
                w = torch.sub(b, aG, out=aG)  # (n, K), in place: the largest tensor of a round
                # subtle: atoms in S are masked with a min-reduction, because a free slot may still name an
                # atom that is back in S in another slot (a plain scatter could unmask it)
                w.scatter_reduce_(1, atom, torch.where(in_S, -math.inf, math.inf), reduce="amin")
                best, new = w.max(1)  # (n,)
                optimal_on_S = ~bad.any(1)
                add = optimal_on_S & (best > self.tol) & ~in_S.all(1)
                # END EXERCISE 9
                i, free = torch.arange(len(atom), device=dev), (~in_S).to(torch.int8).argmax(1)  # first free slot
                atom[i, free] = torch.where(add, new, atom[i, free])
                in_S[i, free] |= add
                G_SS[i, free] = torch.where(add.unsqueeze(1), G[atom[i, free, None], atom], G_SS[i, free])  # new row
                G_SS[i, :, free] = G_SS[i, free]
                finished = optimal_on_S & (best <= self.tol)  # KKT: no atom outside S would lower the objective
                if self.shrink and finished.any():  # bookkeeping: finished states write out their codes and leave
                    A[live[finished]] = A.new_zeros(int(finished.sum()), K).scatter_add_(1, atom[finished], a[finished])
                    solved[live[finished]] = True
                    live, b, atom, in_S, a, G_SS = (t[~finished] for t in (live, b, atom, in_S, a, G_SS))
                    if len(live) == 0:
                        break
            if len(live):  # the states still there: on a GPU all of them; shrinking, those that did not finish
                A[live] = A.new_zeros(len(live), K).scatter_add_(1, atom, a)
                solved[live] = False if self.shrink else finished
            return A, solved

    def objective(self, X, A):
        """Per-row objective 0.5 ||x - a D||^2 + lam ||a||_1 -> (N,)."""
        return 0.5 * ((X - A @ self.D) ** 2).sum(-1) + self.lam * A.abs().sum(-1)

class FistaCoder(SparseCoder):
    """--coder fista: the original's coder (100 FISTA steps) with SparseCoder's interface. Every code is a
    target, as in the original; `solved` says which codes also pass the KKT test of optimality."""
    exact = False

    def __init__(self, D, lam, iters=100, tol=1e-4):
        super().__init__(D, lam, tol=tol)
        self.iters, self.L = iters, torch.linalg.eigvalsh(self.G.cpu().double()).max().to(self.G)  # MPS: no float64

    @torch.no_grad()
    def encode(self, X):
        with full_fp32_matmuls():  # (Machinery: devices)
            A = fista(X, self.D, self.lam, self.iters, self.L)  # (N, K)
            return A, kkt_holds(X, A, self.D, self.lam, self.tol, self.G)  # G: once per dictionary

def kkt_holds(X, A, D, lam, tol, G=None):
    """The KKT test of optimality of codes A (N, K) >= 0 for states X (N, C): the negative gradient
    w = x D^T - lam - a G is at most tol everywhere, and at least -tol on the support. -> (N,) bool."""
    w = X @ D.T - lam - A @ (D @ D.T if G is None else G)  # (N, K)
    return ((w <= tol) & ((A == 0) | (w >= -tol))).all(1)

class ReferenceCoder:
    """--coder reference: active_set_one for each state in turn, so that exercise 2's coder drives a whole run."""
    exact, objective = True, SparseCoder.objective

    def __init__(self, D, lam):
        self.D, self.lam = D, lam

    @torch.no_grad()
    def encode(self, X):
        A = torch.stack([active_set_one(x, self.D, self.lam) for x in X]) if len(X) else X.new_zeros(0, len(self.D))
        return A, torch.ones(len(X), dtype=torch.bool, device=X.device)  # (N, K), (N,): every code solved

def make_coder(D, cfg):
    if cfg.coder == "exact":
        return SparseCoder(D, cfg.lam, cfg.coder_rounds)
    return FistaCoder(D, cfg.lam) if cfg.coder == "fista" else ReferenceCoder(D, cfg.lam)

# --- 4. The concept distribution, and the targets of a batch ------------------------------------------------------
def code_distribution(A):
    """Codes A (N, K) >= 0 -> concept distributions p = a / ||a||_1 (N, K), and valid (N,) bool: False where
    the code is all zero, which has no distribution (its row of p is zero)."""
    # BEGIN EXERCISE 4: the concept distribution
    mass = A.sum(-1, keepdim=True)  # (N, 1)
    return A / mass.clamp(min=1e-12), mass.squeeze(-1) > 0
    # END EXERCISE 4

class ConceptTargets:
    """Everything the student's targets need, in one object: the model whose states are coded (`source`: the
    teacher; with --teacher self the student), the coder with its dictionary, the mean state and the layer.
    targets(ids, pos) codes the source's states at positions pos (B, m) of unmasked rows ids (B, T);
    targets.of_states(h) codes given states h (M, C). Both -> (p (M, K), counters): the concept distributions,
    a zero row where a position gets no target (an all-zero code, or an exact code unfinished within
    --coder_rounds: it adds 0 to the loss and counts in its mean, as all-zero codes do in the original)."""

    def __init__(self, source, coder, mean, layer):
        self.source, self.coder, self.mean, self.layer = source, coder, mean, layer

    @classmethod
    def of_dictionary(cls, source, D, mean, cfg, device):
        """From a dictionary D (K, C) and mean state (C,), with --coder's coder, on the device."""
        return cls(source, make_coder(D.to(device), cfg), mean.to(device), cfg.teacher_layer)

    @torch.no_grad()
    def codes(self, h):
        """States h (N, C) -> (codes A (N, K), solved (N,)). subtle: in fp32 even inside the training step's
        bf16 / fp16 autocast, as the dictionary's states and every evaluation are: half precision moves supports."""
        with torch.autocast(h.device.type, enabled=False):
            return self.coder.encode(normalise_states(h.float(), self.mean))

    @torch.no_grad()
    def of_states(self, h):
        A, solved = self.codes(h)  # (M, K), (M,)
        p, has_mass = code_distribution(A)
        target = p * (solved | (not self.coder.exact))[:, None]  # approximate codes are all targets
        return target, {"zero_codes": (~has_mass).sum(), "unsolved_codes": (~solved).sum()}

    @torch.no_grad()
    def __call__(self, ids, pos):
        # subtle: the teacher sees the *unmasked* input, as in the original
        with torch.autocast(ids.device.type, enabled=False):
            h = self.source(ids, layer=self.layer, pos=pos)  # (M, C)
        return self.of_states(h)

class TokenTargets:
    """--targets tokens, the control: plain distillation (the original's trainer offers it too). targets(ids, pos)
    -> (the teacher's token distribution at positions pos (B, m) of unmasked rows ids (B, T): (M, V), counters {}),
    in place of its concepts; the student's concept head then predicts V "concepts", the tokens."""

    def __init__(self, teacher):
        self.source = teacher

    @torch.no_grad()
    def __call__(self, ids, pos):
        # BEGIN EXERCISE 11: the teacher's token distribution
        with torch.autocast(ids.device.type, enabled=False):  # fp32, as the concept targets
            logits = self.source.mlm_logits(self.source(ids, pos=pos))  # (M, V): the teacher reads the unmasked rows
        return F.softmax(logits.float(), dim=-1), {}
        # END EXERCISE 11

# --- 5. The losses ------------------------------------------------------------------------------------------------
def concept_kl(logits, target):
    """MLSM's loss, the KL divergence from the target concept distribution p to the student's q:
        L_MLSM = 1/M sum_m sum_k p_mk (log p_mk - log q_mk),  q_m = softmax(logits_m).
    As in the original (KLDivLoss, reduction="batchmean"), a row with no distribution (an all-zero target)
    adds 0 to the sum but still counts in M. logits (M, K), target (M, K) rows summing to 1 or 0."""
    # BEGIN EXERCISE 5: the KL loss
    logq = F.log_softmax(logits.float(), dim=-1)  # (M, K)
    kl = (torch.xlogy(target, target) - target * logq).sum(-1)  # (M,); xlogy makes 0 log 0 = 0
    return kl.mean()
    # END EXERCISE 5

def mlm_loss(logits, targets):
    """Masked-LM cross-entropy over the M masked positions only:
    L_MLM = -1/M sum_m log softmax(logits_m)[target_m]."""
    return F.cross_entropy(logits.float(), targets)

# --- 6. Masking, batches and the training step --------------------------------------------------------------------
def mask_tokens(ids, rate, gen):
    """Packed rows ids (B, T) -> (masked ids (B, T), positions pos (B, m)): m = max(1, round(rate * (T-2)))
    distinct positions per row, drawn uniformly from 1..T-2 ([CLS] and [SEP] are never masked) with the generator
    gen alone, every one replaced by [MASK].

    As in the original, every selected token becomes [MASK] (no BERT 80/10/10). A fixed m per row means every
    batch has M = B m masked positions, and a GPU never has to report how many."""
    # BEGIN EXERCISE 6: masking
    B, T = ids.shape
    m = max(1, round(rate * (T - 2)))
    pos = torch.rand(B, T - 2, generator=gen, device=ids.device).argsort(1)[:, :m] + 1  # (B, m)
    return ids.scatter(1, pos, MASK), pos
    # END EXERCISE 6

# Seed salts: each stream of random draws has its own, so that batches, masks and dropout are a function of
# (seed, salt, step) alone, and the MLM baseline draws exactly the student's batches and masks.
DROPOUT, TEACHER_BATCHES, STUDENT_BATCHES, HEAD_BATCHES, FINETUNE_BATCHES = range(5)

def step_seed(cfg, salt, step):
    """One seed per (run, stage, step): batches and masks are a function of the step alone, so a
    resumed run draws exactly what the uninterrupted one would have."""
    return int(np.random.SeedSequence([cfg.seed, salt, step]).generate_state(1)[0])

def get_batch(rows, cfg, salt, step, device, part=slice(None)):
    """The step's random rows -> (ids (B, T), masked ids (B, T), masked positions (B, m)).

    Under torchrun every process draws the whole batch and its masks from the step's seed and keeps
    its own share of the rows, so N processes train on exactly the batches and masks of one; part (a
    slice of that share, with --micro_batch) keeps some of them in the same way."""
    seed = step_seed(cfg, salt, step)
    idx = np.random.default_rng(seed).integers(0, len(rows), cfg.batch_size)
    ids = to_device(torch.from_numpy(rows[idx].astype(np.int64)), device)  # (B, T); to_device: Machinery
    gen = torch.Generator(device=device).manual_seed(seed)
    rank, world = shard()
    share = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
    return tuple(t[share][part] for t in (ids, *mask_tokens(ids, cfg.mask_rate, gen)))

def shard():
    """(rank, number of processes): (0, 1) unless started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

# A loss function is what train_loop (Training, below) optimises, for every model: loss_fn(net, step, part) ->
# (loss, counters {name: tensor}) on the rows `part` of step's batch -- net: the model as trained (wrapped for
# several processes or compiled); counters are summed over steps and processes.
def count(pos):
    """The number of masked positions as a tensor on their device. subtle: not torch.tensor(n), which lives
    on the CPU, where NCCL cannot sum it with the other processes' counters."""
    return torch.full((), pos.numel(), device=pos.device)

def student_loss(student, h, p, ids, pos, cfg):
    """The student's objective at the masked positions pos (B, m): L_MLSM of its concept logits to the targets
    p (M, K), plus mlm_weight * L_MLM of its token logits to the unmasked ids (B, T) there (BabyLM 2023's
    joint loss). h (M, C): the student's states at the masked positions of the masked input."""
    # BEGIN EXERCISE 7: the student's loss
    loss = concept_kl(student.concept_logits(h), p)
    if cfg.mlm_weight:
        loss = loss + cfg.mlm_weight * mlm_loss(student.mlm_logits(h), at(ids, pos))
    return loss
    # END EXERCISE 7

def make_mlsm_loss(student, targets, rows, cfg, device):
    """loss_fn(net, step, part) of the MLSM student, given the teacher's ConceptTargets. Under torchrun each
    process computes the targets of its own rows."""
    def loss_fn(net, step, part):
        ids, x, pos = get_batch(rows, cfg, STUDENT_BATCHES, step, device, part)  # (B, T), (B, T), (B, m)
        p, counters = targets(ids, pos)  # (M, K)
        h = net(x, pos=pos)  # (M, C)
        return student_loss(student, h, p, ids, pos, cfg), {"masked": count(pos), **counters}
    return loss_fn

def make_mlm_loss(model, rows, cfg, salt, device):
    """loss_fn(net, step, part) for plain MLM: the model sees the masked input and predicts the original tokens."""
    def loss_fn(net, step, part):
        ids, x, pos = get_batch(rows, cfg, salt, step, device, part)  # (B, T), (B, T), (B, m)
        h = net(x, pos=pos)  # (M, C): heads only at the M = B m masked positions
        return mlm_loss(model.mlm_logits(h), at(ids, pos)), {"masked": count(pos)}
    return loss_fn

# --- 7. The frozen backbone and its linear token head (BabyLM 2024) -----------------------------------------------
def freeze(model):
    """subtle: requires_grad=False keeps the optimiser away; eval() switches dropout off."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()

def unigram_logp(rows, vocab_size):
    """Log training-set frequencies of the tokens, add-one smoothed -> (V,) float32."""
    counts = np.bincount(rows[:, 1:-1].ravel(), minlength=vocab_size) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()

def make_head(cfg, rows, vocab_size):
    """The token head of a frozen student: a linear layer with bias from its K concept logits to V token
    logits, trained with L_MLM while every student parameter stays as it was.

    Init (ours; the paper does not say): W = 0 and b = log unigram frequencies of the training rows, so the head
    starts as the unigram model and what it learns beyond that comes from the concepts (README: Exercises)."""
    head = nn.Linear(cfg.n_concepts, vocab_size)
    # BEGIN EXERCISE 8: the head's initialisation
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(unigram_logp(rows, vocab_size))
    # END EXERCISE 8
    return head

def make_head_loss(student, rows, cfg, device):
    """loss_fn(net, step, part) of the token head `net` on the frozen student: L_MLM of net(concept logits)."""
    def loss_fn(net, step, part):
        ids, x, pos = get_batch(rows, cfg, HEAD_BATCHES, step, device, part)  # (B, T), (B, T), (B, m)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # in fp32, as evaluation computes them
            z = student.concept_logits(student(x, pos=pos))  # (M, K)
        return mlm_loss(net(z), at(ids, pos)), {}
    return loss_fn

def head_scorer(student, head):
    """Frozen student + token head as a token scorer."""
    return lambda ids, keep, pos: head(student.concept_logits(student(ids, keep, pos=pos)))

# === Training: one loop for the teacher, the student, the head, the baseline and fine-tuning ======================
# AdamW, warmup + linear decay, clipping, bf16 or fp16 autocast on a GPU (--dtype), data parallel under
# torchrun, atomic checkpoints, exact resume.
def make_optimizer(model, lr, steps, cfg, device):
    """AdamW over the trainable parameters, and its schedule: linear warmup over cfg.warmup of the steps,
    then linear decay to zero. -> (optimizer, scheduler)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # no weight decay on biases, LayerNorm gains and embeddings (and so never on the head's unigram-initialised
    # bias): decay pulls them towards 0, which is no sensible prior for them
    decays = [p.dim() >= 2 and "emb" not in n for n, p in named]
    groups = [{"params": [p for (_, p), d in zip(named, decays) if d]},
              {"params": [p for (_, p), d in zip(named, decays) if not d], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    warm = max(1, round(cfg.warmup * steps))
    factor = lambda s: min((s + 1) / warm, (steps - s) / max(1, steps - warm))  # of the peak lr at step s
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

def save_checkpoint(path, parts, loss_fn, extra):
    """Atomically, the state dicts of parts {name: model, optimizer, ...}, the loss function's state when it keeps
    one (--teacher self's dictionary), and extra ({step, totals, elapsed, curve} in training; {info} at the end)."""
    ck = {name: part.state_dict() for name, part in parts.items()} | extra
    if hasattr(loss_fn, "state_dict"):
        ck["loss_state"] = loss_fn.state_dict()
    atomic_write(path, lambda f: torch.save(ck, f))  # atomic_write, load: Machinery, files

def resume(path, parts, loss_fn):
    """Load what save_checkpoint wrote into parts and loss_fn -> the checkpoint, or None where there is none."""
    if not path.exists():
        return None
    ck = load(path)
    for name, part in parts.items():
        if ck.get(name):  # subtle: a run without fp16 saves an empty scaler state, which fp16 starts afresh
            part.load_state_dict(ck[name])
    if "loss_state" in ck:
        loss_fn.load_state_dict(ck["loss_state"])
    return ck

def train_loop(name, model, loss_fn, steps, lr, cfg, out, device, curve=None, parallel=True):
    """Optimise `model`'s trainable parameters for `steps` steps of loss_fn(net, step, part) -> (loss, counters)
    on the rows `part` of the step's batch (all of them, or --micro_batch at a time); net is `model`, wrapped by
    DistributedDataParallel under torchrun (unless parallel=False) and by torch.compile with --compile. Counters
    are summed over steps and processes. curve() -> {name: float} is measured at cfg.curve_points + 1 evenly
    spaced steps, outside the training time. <out>/<name>.ckpt.pt is resumed. -> (totals, seconds, curve points)."""
    rank, world = shard() if parallel else (0, 1)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else None  # averages gradients over processes
    net = ddp or model
    net = torch.compile(net) if cfg.compile else net  # shares parameters with `model`, which is what is saved
    optimizer, schedule = make_optimizer(model, lr, steps, cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = step_dtype(cfg.dtype, device)  # step_dtype, sync: Machinery, devices
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # fp16 has a narrow range: small gradients underflow to 0 unless the loss is scaled up first
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    parts, path = dict(model=model, opt=optimizer, sched=schedule, scaler=scaler), Path(out) / f"{name}.ckpt.pt"
    ck = resume(path, parts, loss_fn) or {"step": 0, "totals": {}, "elapsed": 0.0, "curve": []}
    if ck["step"]:
        print(f"{name}: resuming at step {ck['step']} of {steps}")
    totals, points = {k: v.to(device) for k, v in ck["totals"].items()}, ck["curve"]
    start = time.time() - ck["elapsed"]  # training seconds: time.time() - start, curve points left out
    at_steps = {round(k * steps / cfg.curve_points) for k in range(cfg.curve_points + 1)} if curve else set()

    def measure(step):  # a curve point, on rank 0 alone (the others wait in the next step's all-reduce)
        nonlocal start
        if rank == 0 and step in at_steps and not any(p["step"] == step for p in points):
            paused = time.time()
            with torch.no_grad():
                model.eval()
                points.append({"step": step, "tokens": step * cfg.batch_size * cfg.seq_len,
                               "seconds": paused - start, **curve()})
            start += time.time() - paused

    bar, recent = tqdm(range(ck["step"], steps), initial=ck["step"], total=steps, desc=name, disable=rank > 0), 0.0
    for step in bar:
        measure(step)
        model.train()
        torch.manual_seed(step_seed(cfg, DROPOUT, step) + rank)  # dropout too is a function of the step alone
        optimizer.zero_grad(set_to_none=True)
        loss, counters = gradients(name, net, ddp, loss_fn, step, cfg, world, autocast, scaler)
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        scaler.step(optimizer)  # skipped where fp16 gradients overflowed (and the scale is lowered)
        scaler.update()
        schedule.step()
        add_counters(totals, counters, world)
        recent = recent + loss.detach()
        if (step + 1) % cfg.log_every == 0:  # .item() waits for the device: only at log intervals
            if world > 1:  # the loss of the whole batch, not of this process's share
                dist.all_reduce(recent)
            bar.set_postfix(loss=f"{recent.item() / cfg.log_every / world:.4f}", **unsolved_share(totals))
            recent = 0.0
        if rank == 0 and (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps:
            save_checkpoint(path, parts, loss_fn, dict(step=step + 1, totals={k: v.cpu() for k, v in totals.items()},
                                                       elapsed=time.time() - start, curve=points))
    measure(steps)
    sync(device)  # the time is the device's: it may still be running the last steps
    model.eval()
    return {k: float(v) for k, v in totals.items()}, time.time() - start, points

def gradients(name, net, ddp, loss_fn, step, cfg, world, autocast, scaler):
    """The forward and backward passes of a step over this process's rows, --micro_batch rows at a time, with one
    all-reduce of the gradients under torchrun -> (loss, counters) of the step."""
    rows = cfg.batch_size // world  # this process's rows of the step, in chunks of --micro_batch (0: one chunk)
    size = cfg.micro_batch or rows
    chunks = [(slice(i, i + size), min(size, rows - i) / rows) for i in range(0, rows, size)]  # [(rows, share)]
    loss, counters = 0.0, {}
    try:
        for i, (part, share) in enumerate(chunks):
            with ddp.no_sync() if ddp and i < len(chunks) - 1 else contextlib.nullcontext():  # one all-reduce a step
                with autocast:
                    chunk_loss, chunk_counters = loss_fn(net, step, part)
                scaler.scale(chunk_loss * share).backward()  # without fp16, scaler passes everything unchanged
            loss = loss + chunk_loss.detach() * share
            counters = {k: counters.get(k, 0) + v for k, v in chunk_counters.items()}
    except torch.OutOfMemoryError:
        raise UserError(f"{name}: out of GPU memory in a step of {rows} rows; run the same command with "
                        f"--micro_batch {max(1, rows // 4)} (the same training, that many rows at a time): it "
                        f"resumes from the last checkpoint") from None
    return loss, counters

def add_counters(totals, counters, world):
    """Add a step's counters to the totals; under torchrun, those of the whole batch (one small all-reduce, no
    wait on the host)."""
    if world > 1 and counters:
        summed = torch.stack(list(counters.values()))
        dist.all_reduce(summed)
        counters = dict(zip(counters, summed))
    for k, v in counters.items():
        totals[k] = totals.get(k, 0) + v.detach()

def unsolved_share(totals):
    """{"unsolved": share} for the progress bar, once more than 1% of the targets so far had no exact code."""
    share = float(totals.get("unsolved_codes", 0)) / max(1.0, float(totals.get("masked", 0)))
    return {"unsolved": f"{share:.1%}"} if share > 0.01 else {}

def train_or_load(name, model, loss_fn, steps, lr, cfg, out, device, curve=None):
    """A training stage: load <out>/<name>.pt if it exists, else train and save it. -> (model, info)."""
    path = Path(out) / f"{name}.pt"  # the last checkpoint, without the optimizer
    ck = resume(path, {"model": model}, loss_fn)
    if ck:
        return model.eval(), ck["info"]
    totals, seconds, points = train_loop(name, model, loss_fn, steps, lr, cfg, out, device, curve)
    info = {"totals": totals, "seconds": seconds, "curve": points}
    if shard()[0] == 0:
        save_checkpoint(path, {"model": model}, loss_fn, {"info": info})
        (Path(out) / f"{name}.ckpt.pt").unlink(missing_ok=True)
    return model, info

# === Stages 3-6: the teacher, the concepts, the student, the head =================================================
def train_mlm(name, cfg, rows, vocab_size, steps, salt, out, device, dev=None):
    """The teacher (TEACHER_BATCHES), or the MLM baseline (STUDENT_BATCHES: the student's batches and masks)."""
    model = build_encoder(cfg, vocab_size).to(device)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return train_or_load(name, model, make_mlm_loss(model, rows, cfg, salt, device), steps, cfg.lr, cfg, out, device,
                         partial(dev.point, mlm_scorer(model)) if dev else None)

def learn_concepts(cfg, teacher, train_rows, dev_rows, out, device):
    """Stage 4: the dictionary, learned once (by rank 0 under torchrun) from teacher states and saved.
    -> (the teacher's ConceptTargets, info with the dictionary's quality on held-out dev states)."""
    path = Path(out) / "dictionary.npz"
    if shard()[0] == 0 and not path.exists():
        t0 = time.time()
        H, _ = teacher_states(teacher, train_rows, cfg, cfg.dict_tokens, device, cfg.seed)
        if len(H) < cfg.n_concepts:
            raise UserError(f"only {len(H)} teacher states for {cfg.n_concepts} concepts; lower --n_concepts "
                            f"or give more data")
        print(f"concepts: dictionary of {cfg.n_concepts} atoms from {len(H)} teacher states ...", flush=True)
        D, mean = learn_dictionary(H, cfg)
        held_out = teacher_states(teacher, dev_rows, cfg, 2000, device, cfg.seed + 1)[0]
        info = code_quality(ConceptTargets.of_dictionary(None, D, mean, cfg, device), held_out)  # (Evaluation)
        info["seconds"] = time.time() - t0
        atomic_write(path, lambda f: np.savez(f, D=D.numpy(), mean=mean.numpy(), info=json.dumps(info)))
    barrier()  # (Machinery: processes) the others wait for rank 0's dictionary
    z = load(path)
    D, mean, info = torch.from_numpy(z["D"]), torch.from_numpy(z["mean"]), json.loads(str(z["info"]))
    if info["unsolved"] and cfg.coder == "exact" and shard()[0] == 0:
        print(f"warning: {info['unsolved']} held-out codes were not solved within --coder_rounds {cfg.coder_rounds}; "
              f"such masked tokens get no target in the student's training: raise --coder_rounds", file=sys.stderr)
    return ConceptTargets.of_dictionary(teacher, D, mean, cfg, device), info

def train_student(cfg, targets, rows, dev, vocab_size, out, device):
    """Stage 5: the student, trained with MLSM on the teacher's concepts (targets), or with --teacher self
    (targets None) on its own. -> (student, info, the concept targets its training ended with)."""
    K = vocab_size if cfg.targets == "tokens" else cfg.n_concepts  # --targets tokens: V "concepts", the tokens
    student = build_encoder(cfg, vocab_size, K).to(device)
    print(f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters")
    if not cfg.mlm_weight and targets is not None:  # subtle: the token head gets no gradient; DDP must know
        for p in [*student.mlm_transform.parameters(), student.mlm_bias]:
            p.requires_grad_(False)
    if targets is None:  # SelfConcepts: the section after this one; student_curve: Evaluation
        loss_fn = SelfConcepts(student, rows, cfg, device)
        curve = loss_fn.curve(dev) if dev else None
    else:
        taught = TokenTargets(targets.source) if cfg.targets == "tokens" else targets
        loss_fn = make_mlsm_loss(student, taught, rows, cfg, device)
        curve = student_curve(student, taught, dev) if dev else None
    student, info = train_or_load("student", student, loss_fn, cfg.student_steps, cfg.lr, cfg, out, device, curve)
    if targets is None:  # from here on the student is its own teacher, with its last dictionary
        if loss_fn.targets is None:
            raise UserError(f"--teacher self learned no dictionary in {cfg.student_steps} student steps: raise "
                            f"--student_steps or lower --self_every")
        targets = loss_fn.targets
        targets.source = student
        if dev:  # the dictionary's quality on the student's own states at the dev masks
            H = torch.cat([at(loss_fn.states_of(x), pos) for _, x, pos in dev.batches])  # (M, C)
            # code_quality: Evaluation
            info["dictionary"] = code_quality(targets, H) | {"seconds": 0.0, "in_student_seconds": loss_fn.seconds}
    return student, info, targets

def train_head(cfg, student, rows, vocab_size, out, device, dev=None):
    """Stage 6: only the linear token head on the frozen student's concept logits, trained with L_MLM."""
    freeze(student)
    K = student.concept_head[-1].out_features
    head = make_head(dataclasses.replace(cfg, n_concepts=K), rows, vocab_size).to(device)
    return train_or_load("head", head, make_head_loss(student, rows, cfg, device), cfg.head_steps, cfg.head_lr, cfg,
                         out, device, partial(dev.point, head_scorer(student, head)) if dev else None)

# === The original's second mode, without an auxiliary model: --teacher self =======================================
class SelfConcepts:
    """loss_fn(net, step, part) of --teacher self: MLSM without an auxiliary model (the original's negative
    --dict_file). Plain MLM until the first dictionary; every `every` steps a dictionary is learned, warm-started,
    from the student's states at every position of the masked rows of the steps just before, as in the original;
    from then on a step's targets are the codes of the student's own states at its masked positions.
    Where it differs from the original, and why: the states (block teacher_layer) are read as a teacher's are, in
    fp32 and without dropout or gradient -- one more forward pass a step (the original codes those of its training
    pass) -- so that a target does not depend on the step's dropout or autocast; they are centred (unless
    --no-center) and coded exactly, as in the teacher mode (the original: uncentred, FISTA); and the original
    learns after and every 10,000 of its 100,000 updates, from its last 200 batches, while our presets train a
    few thousand steps, so the schedule is a share of them.
    subtle: state_dict() (dictionary and collected states) goes into the checkpoints, so a run resumes exactly."""

    def __init__(self, student, rows, cfg, device):
        self.student, self.rows, self.cfg, self.device = student, rows, cfg, device
        self.every = max(1, round(cfg.self_every * cfg.student_steps))
        self.window = math.ceil(cfg.dict_tokens / (cfg.batch_size * cfg.seq_len))  # steps a dictionary learns from
        self.load_state_dict({"states": [], "D": None, "mean": None, "seconds": 0.0})

    def state_dict(self):
        return {"states": self.states, "D": self.D, "mean": self.mean, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.states, self.D, self.mean, self.seconds = state["states"], state["D"], state["mean"], state["seconds"]
        self.targets = None if self.D is None else ConceptTargets.of_dictionary(None, self.D, self.mean, self.cfg,
                                                                                 self.device)

    def states_of(self, x):
        """The concept layer's states of the masked rows x (B, T) -> (B, T, C), in fp32, without dropout."""
        training = self.student.training
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            H = self.student.eval()(x, layer=self.cfg.teacher_layer)  # (B, T, C)
        self.student.train(training)
        return H

    def collect(self, H):
        """Keep the states of every position of H (B, T, C) for the next dictionary; under torchrun, the whole
        batch's."""
        H = H.flatten(0, 1)  # (B T, C)
        if dist.is_initialized():
            every = torch.empty(len(H) * dist.get_world_size(), H.shape[1], device=H.device)
            dist.all_gather_into_tensor(every, H)
            H = every
        self.states.append(H.cpu())

    def relearn(self):
        """A dictionary from the collected states: learned on rank 0, sent to every process."""
        t0, H = time.time(), torch.cat(self.states)  # (N, C)
        D, mean = learn_dictionary(H, self.cfg, self.D) if shard()[0] == 0 else \
            (torch.empty(self.cfg.n_concepts, H.shape[1]), torch.empty(H.shape[1]))
        if dist.is_initialized():
            D, mean = D.to(self.device), mean.to(self.device)
            for t in (D, mean):
                dist.broadcast(t, 0)
        self.load_state_dict({"states": [], "D": D.cpu(), "mean": mean.cpu(),
                              "seconds": self.seconds + time.time() - t0})

    def __call__(self, net, step, part):
        cfg, student = self.cfg, self.student
        if step % self.every == 0 and self.states and not part.start:  # at the step's first chunk of rows
            self.relearn()
        ids, x, pos = get_batch(self.rows, cfg, STUDENT_BATCHES, step, self.device, part)  # (B, T), (B, T), (B, m)
        collecting = step % self.every >= self.every - self.window and step + 1 < cfg.student_steps
        H = self.states_of(x) if collecting or self.targets else None  # (B, T, C)
        if collecting:
            self.collect(H)
        h = net(x, pos=pos)  # (M, C)
        if self.targets is None:  # before the first dictionary: plain MLM
            loss = mlm_loss(student.mlm_logits(h), at(ids, pos)) + self.idle(student.concept_head)
            return loss, {"masked": count(pos)}
        p, counters = self.targets.of_states(at(H, pos))  # (M, K)
        loss = student_loss(student, h, p, ids, pos, cfg)
        if not cfg.mlm_weight:
            loss = loss + self.idle(student.mlm_transform) + self.idle(student.mlm_bias)
        return loss, {"masked": count(pos), **counters}

    def curve(self, dev):
        """-> curve() at the fixed dev masks: the norm of the mean direction of the student's states (1 when every
        state points the same way: a collapse shows here), and, once it has a dictionary, its KL to the concepts
        of its own states."""
        def curve():
            kl, n, direction = 0.0, 0, 0.0
            for _, x, pos in dev.batches:
                h = self.student(x, pos=pos)  # (M, C)
                n, direction = n + len(h), direction + F.normalize(h.float(), dim=-1).sum(0)  # (C,)
                if self.targets is not None:
                    p = self.targets.of_states(at(self.states_of(x), pos))[0]  # (M, K)
                    kl = kl + concept_kl(self.student.concept_logits(h), p) * len(p)
            point = {"state_alignment": float(direction.norm()) / n}
            return point if self.targets is None else point | {"dev_kl": float(kl) / n}
        return curve

    @staticmethod
    def idle(part):
        """0, in the graph of a head this step does not use. subtle: DistributedDataParallel needs every
        parameter in every step's backward pass (on one process nothing is added)."""
        params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
        return 0.0 * sum(p.sum() for p in params) if dist.is_initialized() else 0.0

# === Evaluation: dev loss, minimal pairs by pseudo-log-likelihood, the dictionary, fine-tuning, report ============
EVAL_MASK_RATE = 0.15  # dev numbers always mask 15%, whatever --mask_rate: recipes stay comparable

def dev_batches(rows, cfg, device):
    """The first eval_rows dev rows in batches, each with its fixed masks: the same for every model, every
    curve point and every --mask_rate. -> [(ids (B, T), masked ids (B, T), positions (B, m))]."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
    rows = rows[: cfg.eval_rows]
    batches = []
    for i in range(0, len(rows), cfg.batch_size):
        ids = torch.from_numpy(rows[i:i + cfg.batch_size].astype(np.int64)).to(device)  # (B, T)
        batches.append((ids, *mask_tokens(ids, EVAL_MASK_RATE, gen)))
    return batches

class DevSet:
    """What every model is measured on along its training: the dev batches with their fixed masks, and the
    first curve_pairs pairs of each BLiMP paradigm. point(token_logits) is one learning-curve point."""

    def __init__(self, rows, cfg, tok, pair_sets, device):
        self.batches, self.cfg, self.tok, self.device = dev_batches(rows, cfg, device), cfg, tok, device
        self.pairs = {k: v[: cfg.curve_pairs] for k, v in pair_sets.get("BLiMP", {}).items()} if cfg.curve_pairs else {}

    def point(self, token_logits):
        r = {"dev_loss": eval_mlm(token_logits, self.batches)["dev_loss"]}
        if self.pairs:
            r["BLiMP"] = minimal_pairs(token_logits, self.tok, self.pairs, self.cfg, self.device)["macro"]
        return r

def student_curve(student, targets, dev):
    """-> curve() of the student: its KL to the teacher's concept targets at the fixed dev masks (computed once)."""
    fixed = [targets(ids, pos)[0] for ids, _, pos in dev.batches]  # [(M, K)]

    def curve():
        kl = sum(concept_kl(student.concept_logits(student(x, pos=pos)), p) * len(p)
                 for (_, x, pos), p in zip(dev.batches, fixed))
        return {"dev_kl": float(kl) / sum(len(p) for p in fixed)}
    return curve

@torch.no_grad()
def eval_mlm(token_logits, batches):
    """Dev MLM loss and accuracy of a token scorer on dev_batches, the same fixed masks for every model."""
    loss = correct = n = 0.0
    for ids, x, pos in batches:
        logits = token_logits(x, None, pos).float()  # (M, V); keep None: full rows, no padding
        y = at(ids, pos)  # (M,)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        n += len(y)
    return {"dev_loss": loss / max(n, 1), "dev_acc": correct / max(n, 1)}

def unigram_scorer(train_rows, vocab_size, device):
    """A model that ignores context, train-set unigram frequencies, as token_logits: the floor of
    the dev loss, and on minimal pairs what word frequency alone gets right."""
    logp = unigram_logp(train_rows, vocab_size).to(device)  # (V,)
    return lambda ids, keep, pos: logp.repeat(pos.numel(), 1)  # (M, V)

@torch.no_grad()
def pseudo_log_likelihoods(token_logits, tok, sentences, cfg, device, word_l2r=True):
    """Pseudo-log-likelihood of each sentence s = s_1 .. s_n (Salazar et al. 2020):
        PLL(s) = sum_i log p(s_i | s with token i masked)
    and by default its word-l2r variant (Kauf & Ivanova 2023): when token i is scored, the later
    tokens of the same word are masked too, so that a word split into pieces cannot be read off its
    own pieces (" walk|ing": "ing" would give away " walk"). A word is one pre-token of the tokenizer.
    The softmax is over real tokens: special tokens are never the answer.

    Batched: one masked copy of a sentence per scored token, copies of similar length in one batch.
    token_logits(ids (B, T), keep (B, T), pos (B, 1)) -> (B, V). Sentences longer than seq_len are
    cut to it. -> (N,) float64 numpy."""
    seqs, words = [], []  # token ids, and the index of the word each token belongs to (-1: special)
    for s in sentences:
        pieces = [tok.encode_word(w) for w in PRETOKEN.findall(s)]  # PRETOKEN: Machinery, BPE
        ids = [i for p in pieces for i in p][: cfg.seq_len - 2]
        seqs.append([CLS] + ids + [SEP])
        words.append([-1] + [w for w, p in enumerate(pieces) for _ in p][: len(ids)] + [-1])
    pad = lambda lists, value: nn.utils.rnn.pad_sequence([torch.tensor(q) for q in lists], True, value).numpy()
    padded, word = pad(seqs, PAD), pad(words, -1)  # (N, L) each
    jobs = sorted((len(q), j, i) for j, q in enumerate(seqs) for i in range(1, len(q) - 1))  # by length
    pll, b = np.zeros(len(seqs)), 0
    while b < len(jobs):
        e = b + 1  # grow the batch while its padded size stays within 2 training batches of tokens
        # (bigger batches were slower on a CPU: their activations fall out of the cache)
        while e < len(jobs) and (e + 1 - b) * jobs[e][0] <= 2 * cfg.batch_size * cfg.seq_len:
            e += 1
        chunk, b = jobs[b:e], e
        T = chunk[-1][0]  # the longest copy is last
        rows, at_i = np.array([j for _, j, _ in chunk]), np.array([i for _, _, i in chunk])  # (B,), (B,)
        ids, w = padded[rows, :T], word[rows, :T]  # (B, T) each
        # BEGIN EXERCISE 10: hide the scored token (and, word_l2r, the rest of its word); its log-probability
        later = np.arange(T) >= at_i[:, None]  # (B, T): position i and those after it
        hide = later & (w == w[np.arange(len(chunk)), at_i][:, None]) if word_l2r else np.arange(T) == at_i[:, None]
        ids, hide = torch.from_numpy(ids).to(device), torch.from_numpy(hide).to(device)
        pos = torch.from_numpy(at_i[:, None]).to(device)  # (B, 1): the scored position of each copy
        logits = token_logits(ids.masked_fill(hide, MASK), ids != PAD, pos).float()  # (B, V)
        logits[:, :N_SPECIAL] = -math.inf
        logp = F.log_softmax(logits, -1).gather(1, ids.gather(1, pos)).squeeze(1)  # (B,)
        # END EXERCISE 10
        np.add.at(pll, rows, logp.cpu().double().numpy())
    return pll

def minimal_pairs(token_logits, tok, pairs, cfg, device):
    """Accuracy on minimal pairs {paradigm: [(good, bad)]}: right only if PLL(good) > PLL(bad)
    strictly; ties are counted, and count as wrong (the official BabyLM pipelines count them right)."""
    flat = [p for ps in pairs.values() for p in ps]
    word_l2r = cfg.pll == "word_l2r"
    good = pseudo_log_likelihoods(token_logits, tok, [g for g, _ in flat], cfg, device, word_l2r)
    bad = pseudo_log_likelihoods(token_logits, tok, [b for _, b in flat], cfg, device, word_l2r)
    per, i = {}, 0
    for name, ps in pairs.items():
        per[name] = float((good[i:i + len(ps)] > bad[i:i + len(ps)]).mean())
        i += len(ps)
    return {"macro": float(np.mean(list(per.values()))), "ties": int((good == bad).sum()),
            "pairs": len(flat), "paradigms": per}

def code_quality(targets, H):
    """How well a dictionary codes states H (N, C): relative reconstruction error of the normalised states, mean
    non-zeros, the share of all-zero codes and the number of codes left unsolved."""
    X, (A, solved) = normalise_states(H, targets.mean), targets.codes(H)
    nnz = (A > 0).sum(-1).float()
    return {"rel_error": float(((X - A @ targets.coder.D) ** 2).sum() / (X ** 2).sum()), "nonzeros": float(nnz.mean()),
            "zero_share": float((nnz == 0).float().mean()), "unsolved": int((~solved).sum())}

@torch.no_grad()
def read_concepts(targets, tok, rows, cfg, device, top=12, per=6):
    """The `top` most used concepts on dev text, each with the `per` tokens (distinct types) whose codes weigh
    most on it, in context -- the 'quasi-symbolic' knowledge a student learns."""
    rows = rows[: max(1, 4000 // (cfg.seq_len - 2))]  # about 4,000 dev tokens
    ids = torch.from_numpy(rows.astype(np.int64)).to(device)  # (B, T)
    h = targets.source(ids, layer=targets.layer)[:, 1:-1].float()  # (B, T-2, C): no [CLS] / [SEP]
    A = targets.codes(h.reshape(-1, h.shape[-1]))[0].cpu()  # (B (T-2), K)
    share = (A > 0).float().mean(0)  # (K,): share of tokens whose code uses the concept
    concepts = []
    for k in share.argsort(descending=True)[:top].tolist():
        examples, types = [], set()
        for n in A[:, k].argsort(descending=True).tolist():
            r, i = divmod(n, cfg.seq_len - 2)
            t = int(rows[r, i + 1])
            if A[n, k] <= 0 or len(examples) == per:
                break
            if t not in types:
                types.add(t)
                left, right = tok.decode(rows[r, max(1, i - 3):i + 1]), tok.decode(rows[r, i + 2:i + 5])
                examples.append({"token": tok.decode([t]), "weight": round(float(A[n, k]), 4),
                                 "context": f"{left}[{tok.decode([t])}]{right}".replace("\n", " ")})
        concepts.append({"concept": k, "share_of_tokens": round(float(share[k]), 4), "examples": examples})
    return concepts

@torch.no_grad()
def word_class_amis(targets, student, tok, dev_rows, cfg, device):
    """--preset toy: how well concepts recover the toy language's word classes, as adjusted mutual information
    (0: chance, 1: the classes themselves) -- the top concept of the codes of 3,000 dev tokens, and the
    student's top predicted concept at the masked positions of 64 dev rows."""
    from sklearn.metrics import adjusted_mutual_info_score

    def ami(ids, concepts):  # toy_word_class: Machinery, the toy language
        return float(adjusted_mutual_info_score([toy_word_class(tok.decode([i]).strip()) for i in ids], concepts))
    H, ids = teacher_states(targets.source, dev_rows, cfg, 3000, device, 0)
    A, _ = targets.codes(H.to(device))  # (N, K)
    rows = torch.from_numpy(dev_rows[:64].astype(np.int64)).to(device)  # (B, T)
    x, pos = mask_tokens(rows, cfg.mask_rate, torch.Generator(device=device).manual_seed(0))
    predicted = student.concept_logits(student(x, pos=pos)).argmax(1)  # (M,)
    return {"codes": ami(ids.tolist(), A.argmax(1).cpu().numpy()),
            "student": ami(at(rows, pos).tolist(), predicted.cpu().numpy())}

class PairClassifier(nn.Module):
    """A pretrained encoder with a fresh linear classifier over the [CLS] state."""

    def __init__(self, encoder, n_labels):
        super().__init__()
        self.encoder, self.clf = encoder, nn.Linear(encoder.ln_f.normalized_shape[0], n_labels)

    def forward(self, ids, keep):
        return self.clf(self.encoder(ids, keep)[:, 0])  # (B, n_labels)

def encode_pairs(tok, pairs, seq_len):
    """[(s1, s2, label)] -> (ids (N, T) padded with [PAD], labels (N,)); [CLS] s1 [SEP] s2 [SEP],
    each sentence cut to half of what fits."""
    half = (seq_len - 3) // 2
    seqs = [torch.tensor([CLS] + tok.encode(a)[:half] + [SEP] + tok.encode(b)[:half] + [SEP]) for a, b, _ in pairs]
    return nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=PAD), torch.tensor([y for *_, y in pairs])

def finetune(state, cfg, tok, train_pairs, valid_pairs, seed, name, out, device):
    """Fine-tune every weight of an encoder (state dict) and a fresh classifier on sentence pairs
    with cross-entropy: -> validation accuracy and, for two classes, F1 of class 1."""
    encoder = build_encoder(cfg, tok.vocab_size)
    encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("concept_head.")})  # strict
    n_labels = max(y for *_, y in train_pairs + valid_pairs) + 1
    torch.manual_seed(seed)  # the seed picks the classifier's initial weights and the batches
    model = PairClassifier(encoder, n_labels).to(device)
    X, Y = encode_pairs(tok, train_pairs, cfg.seq_len)
    run_cfg = dataclasses.replace(cfg, seed=seed, compile=False)  # lengths vary: compiling would not pay

    def loss_fn(net, step, part):
        rng = np.random.default_rng(step_seed(run_cfg, FINETUNE_BATCHES, step))
        idx = torch.from_numpy(rng.integers(0, len(X), cfg.batch_size)[part])
        ids = X[idx]  # (B, T)
        ids = to_device(ids[:, : int((ids != PAD).sum(1).max())], device)  # trimmed to the longest pair; Machinery
        return F.cross_entropy(net(ids, ids != PAD).float(), to_device(Y[idx], device)), {}

    train_loop(name, model, loss_fn, cfg.finetune_steps, cfg.finetune_lr, run_cfg, out, device, parallel=False)
    (Path(out) / f"{name}.ckpt.pt").unlink(missing_ok=True)
    Xv, Yv = encode_pairs(tok, valid_pairs, cfg.seq_len)
    with torch.no_grad():
        pred = torch.cat([model(Xv[i:i + 256].to(device), Xv[i:i + 256].to(device) != PAD).argmax(-1).cpu()
                          for i in range(0, len(Xv), 256)])
    r = {"acc": float((pred == Yv).float().mean())}
    if n_labels == 2:  # F1 of the positive class
        from sklearn.metrics import f1_score
        r["f1"] = float(f1_score(Yv, pred, zero_division=0.0))
    return r

def fingerprint(state):
    """A state dict -> a short hash of its names and weights: a cache key that changes with the model."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())  # apart: joining copies them
    return h.hexdigest()[:16]

def probe(states, models, cfg, tok, tasks, out, device):
    """Fine-tune every model {name: state dict} x task x seed, with identical settings, into models[name]: "finetune"
    {task: {"acc": {mean, std, runs}, "f1": ...}} and "finetune_macro", the mean accuracy over tasks. Each result is
    cached in finetune.json under a key that holds the model's fingerprint, so an interrupted probe resumes and a
    retrained model is probed anew. -> models."""
    path = Path(out) / "finetune.json"
    done = load(path) if path.exists() else {}
    for task, (train_pairs, valid_pairs) in tasks.items():
        for model_name, state in states.items():
            weights, runs = fingerprint(state), []
            for seed in range(cfg.finetune_seeds):
                key = f"{task}/{weights}/{seed}/{cfg.finetune_steps}/{cfg.finetune_lr}"
                if key not in done:
                    done[key] = finetune(state, cfg, tok, train_pairs, valid_pairs, seed,
                                         f"finetune_{task}_{weights}_{seed}", out, device)
                    save_json(path, done)
                runs.append(done[key])
            models.setdefault(model_name, {}).setdefault("finetune", {})[task] = {
                m: {"mean": float(np.mean([r[m] for r in runs])), "std": float(np.std([r[m] for r in runs])),
                    "runs": [r[m] for r in runs]} for m in runs[0]}
    for name in states:
        models[name]["finetune_macro"] = float(np.mean([r["acc"]["mean"] for r in models[name]["finetune"].values()]))
    return models

MARKS = {"teacher": "T", "MLM baseline": "B", "MLSM student": "S", "MLSM student + head": "H"}

def chart(curves, key, title, width=64, height=10):
    """Learning curves {name: [{"tokens": .., key: ..}, ..]} as a text chart of `key` against tokens
    seen, each curve drawn with its letter in MARKS ('*' where curves overlap)."""
    series = {name: [(p["tokens"], p[key]) for p in pts if key in p] for name, pts in curves.items() if pts}
    series = {name: xy for name, xy in series.items() if xy}
    if not series:
        return
    xs, ys = [x for xy in series.values() for x, _ in xy], [y for xy in series.values() for _, y in xy]
    lo, hi, right = min(ys), max(ys), max(xs) or 1
    grid = [[" "] * (width + 1) for _ in range(height + 1)]
    for name, xy in series.items():
        for x, y in xy:
            r, c = round((hi - y) / ((hi - lo) or 1) * height), round(x / right * width)
            grid[r][c] = MARKS[name] if grid[r][c] in (" ", MARKS[name]) else "*"
    print(f"\n{title}")
    for r, row in enumerate(grid):
        print(f"{hi - r * (hi - lo) / height:8.3f} |" + "".join(row))
    print(" " * 9 + "+" + "-" * (width + 1))
    print(" " * 10 + "0" + f"{right / 1e6:>{width}.2f}" + "M tokens seen")
    print("  " + "; ".join(f"{MARKS[n]} {n}: {xy[0][1]:.3f} -> {xy[-1][1]:.3f}" for n, xy in series.items()))

def print_table(results):
    """One table: what each model achieved, on the same dev masks, minimal pairs and tasks ('-': no such number)."""
    tasks, rows = list(results["majority_class"]), {}
    for name, r in results["models"].items():
        done = r.get("finetune", {})
        rows[name] = {"dev loss": "dev_loss" in r and f"{r['dev_loss']:.3f}",
                      "dev acc": "dev_acc" in r and f"{r['dev_acc']:.3f}",
                      **{f"{s} (ties)": f"{r[s]['macro']:.3f} ({r[s]['ties']})" for s in ("BLiMP", "supplement")
                         if s in r},
                      **{f"{t} acc": "{mean:.3f}±{std:.3f}".format(**done[t]["acc"]) for t in tasks if t in done},
                      "tasks macro": len(tasks) > 1 and "finetune_macro" in r and f"{r['finetune_macro']:.3f}",
                      "train time": r.get("seconds") is not None and f"{r['seconds'] / 60:.1f} min"}
    columns = ["dev loss", "dev acc", "BLiMP (ties)", "supplement (ties)", *(f"{t} acc" for t in tasks), "tasks macro",
               "train time"]
    columns = [c for c in columns if any(row.get(c) for row in rows.values())]
    widths = {c: max(len(c), *(len(row.get(c) or "-") for row in rows.values())) + 2 for c in columns}
    print("\n" + "=" * 100)
    print(f"{'model':<21}" + "".join(f"{c:>{widths[c]}}" for c in columns))
    for name, row in rows.items():
        print(f"{name:<21}" + "".join(f"{row.get(c) or '-':>{widths[c]}}" for c in columns))

def report(results):
    """The table, what its numbers are, the dictionary, the times, and the learning curves."""
    print_table(results)
    models, c, tasks = results["models"], results["config"], results["majority_class"]
    fista = c["coder"] == "fista"
    print(f"dev: masked tokens of the same {c['eval_rows']} dev rows for every model; minimal pairs: macro average "
          f"over paradigms, ties count as wrong; " + (f"fine-tuning: validation accuracy, mean ± std over "
          f"{c['finetune_seeds']} seeds; " if tasks else "") + ("MLSM rows also need the teacher and dictionary "
          f"({results['mlsm_needs']['teacher and dictionary seconds'] / 60:.1f} min)" if c["teacher"] != "self" else
          "--teacher self: no teacher, the student's own dictionaries are part of its time"))
    for t in tasks:
        f1 = "; ".join(f"{m} {r['finetune'][t]['f1']['mean']:.3f} ± {r['finetune'][t]['f1']['std']:.3f}"
                       for m, r in models.items() if "f1" in r.get("finetune", {}).get(t, {}))
        print(f"{t}: majority class {tasks[t]:.3f}" + (f"; F1 {f1}" if f1 else ""))
    if len(tasks) > 1:
        print(f"tasks macro: majority class {np.mean(list(tasks.values())):.3f}")
    d, n = results["dictionary"], results["student_unsolved_codes"]
    print(f"dictionary: relative reconstruction error {d['rel_error']:.3f}, {d['nonzeros']:.1f} non-zeros per code, "
          f"{d['zero_share']:.2%} all-zero codes (dev states); in student training {results['student_zero_codes']:.2%}"
          f" all-zero codes (no target: they add 0 to the loss, as in the original) and {n:.0f} " +
          ("FISTA codes that fail the optimality test (targets all the same)" if fista else "unsolved (no target)"))
    if n / max(1, results["tokens_seen"]["MLSM student"]) > 0.01 and not fista:
        print(f"warning: {n / results['tokens_seen']['MLSM student']:.1%} of the student's targets had no exact code "
              f"within --coder_rounds {c['coder_rounds']}, and so taught it nothing: raise --coder_rounds")
    if "word_class_ami" in results:
        print("word classes of the toy language: adjusted mutual information with the top concept of the codes "
              "{codes:.3f}, of the student's predictions {student:.3f} (0: chance, 1: the classes)"
              .format(**results["word_class_ami"]))
    times = results["seconds"]
    evaluation = times.get("evaluation", 0) + times.get("finetune", 0)
    print(f"time: {(sum(times.values()) - evaluation) / 60:.1f} min training, {evaluation / 60:.1f} min evaluation "
          f"({results['world_size']} process(es)); " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    curves = {k: v for k, v in results["curves"].items() if k != "MLSM student"}
    chart(curves, "dev_loss", f"learning curves: dev MLM loss at the fixed 15% dev masks (unigram "
                              f"{models['unigram']['dev_loss']:.3f})")
    chart(curves, "BLiMP", f"learning curves: BLiMP, first {c['curve_pairs']} pairs per paradigm")
    student = {"MLSM student": results["curves"]["MLSM student"]}
    source = "its own" if c["teacher"] == "self" else "the teacher's"
    chart(student, "dev_kl", f"learning curve: student's dev KL to {source} concepts")
    chart(student, "state_alignment", "learning curve: norm of the student's mean state direction at the dev "
                                      "masks (1: every state alike)")
    print("=" * 100)

# === The pipeline: run() chains the stages ========================================================================
def run(cfg):
    """The whole pipeline for cfg -> results. What it calls from Machinery (below) sets the run up: processes,
    downloads, the run directory, tokenizer and rows, evaluation data."""
    device = join_processes(cfg)  # under torchrun: this process's device, in the process group
    rank, world = shard()
    out = Path(cfg.out)
    if rank == 0:  # work that is not data-parallel is done once; the other processes load what it wrote
        fetch_missing(cfg)  # a missing --data (or other path) stops the run before anything is written
        prepare_out(cfg)
        make_rows(cfg, out)  # stages 1-2: tokenizer and token rows
    barrier()
    tok, train_rows, dev_rows = load_rows(cfg, out)
    V = tok.vocab_size
    pair_sets, tasks = read_evaluation_data(cfg) if rank == 0 else ({}, {})  # a bad file stops the run now
    dev = DevSet(dev_rows, cfg, tok, pair_sets, device) if rank == 0 else None  # for the learning curves
    warn_if_slow(cfg, sum(p.numel() for p in build_encoder(cfg, V).parameters()), device)

    # 3-6: the teacher and its concepts (none with --teacher self), the student, its head, the MLM baseline
    teacher, teacher_info, targets, dict_info = None, {"seconds": 0.0}, None, None
    if cfg.teacher == "separate":
        teacher, teacher_info = train_mlm("teacher", cfg, train_rows, V, cfg.teacher_steps, TEACHER_BATCHES, out,
                                          device, dev)
        targets, dict_info = learn_concepts(cfg, freeze(teacher), train_rows, dev_rows, out, device)
    student, student_info, targets = train_student(cfg, targets, train_rows, dev, V, out, device)
    head, head_info = train_head(cfg, student, train_rows, V, out, device, dev)
    baseline, baseline_info = None, {}
    if cfg.baseline:  # on the student's batches and masks
        baseline, baseline_info = train_mlm("baseline", cfg, train_rows, V, cfg.student_steps, STUDENT_BATCHES, out,
                                            device, dev)
        freeze(baseline)
    if rank > 0:  # rank 0 evaluates alone; the others wait, so that every process leaves the group together
        barrier()
        return None

    # 7: evaluation
    t0 = time.time()
    concepts = read_concepts(targets, tok, dev_rows, cfg, device)
    save_json(out / "concepts.json", concepts)
    print("most used concepts, with the tokens that weigh most on them:")
    for c in concepts[:8]:
        print(f"  {c['concept']:>5} ({c['share_of_tokens']:.1%} of tokens): "
              + " | ".join(e["context"] for e in c["examples"][:3]))
    models = score_models(cfg, tok, train_rows, dev, pair_sets, teacher, baseline, student, head, device)
    dict_info = dict_info or student_info["dictionary"]
    times = {**load(out / "times.json"), "teacher": teacher_info["seconds"], "concepts": dict_info["seconds"],
             "student": student_info["seconds"], "head": head_info["seconds"]}
    times.update({"baseline": baseline_info["seconds"]} if cfg.baseline else {}, evaluation=time.time() - t0)
    if tasks:  # fine-tuning replaces the heads, so MLSM student and MLSM student + head are one model here
        t0 = time.time()
        encoders = {"MLM baseline": baseline, "MLSM student": student}  # None: not trained
        probe({k: e.state_dict() for k, e in encoders.items() if e is not None}, models, cfg, tok, tasks, out, device)
        times["finetune"] = time.time() - t0
    results = collect_results(cfg, models, dict_info, times, tasks, world, teacher_info, student_info, head_info,
                              baseline_info)
    if cfg.preset == "toy":
        results["word_class_ami"] = word_class_amis(targets, student, tok, dev_rows, cfg, device)
    save_json(out / "results.json", results)
    report(results)
    barrier()
    return results

def score_models(cfg, tok, train_rows, dev, pair_sets, teacher, baseline, student, head, device):
    """Dev loss and accuracy, and minimal pairs, of every model that predicts tokens (None: not trained).
    -> {model name: numbers}; the student alone predicts concepts (unless trained with the joint loss or taught
    tokens)."""
    scorers = {"unigram": unigram_scorer(train_rows, tok.vocab_size, device)}
    for name, model in [("teacher (MLM)", teacher), ("MLM baseline", baseline)]:
        if model is not None:
            scorers[name] = mlm_scorer(model)
    scorers["MLSM student"] = mlm_scorer(student) if cfg.mlm_weight else None  # without tokens: fine-tuned all the same
    if cfg.targets == "tokens":  # the distilled student's V "concepts" are the tokens: it scores them itself
        scorers["MLSM student"] = lambda ids, keep, pos: student.concept_logits(student(ids, keep, pos=pos))
    scorers["MLSM student + head"] = head_scorer(student, head)
    models = {}
    for name, token_logits in scorers.items():
        models[name] = {"seconds": None}
        if token_logits:
            models[name].update(eval_mlm(token_logits, dev.batches))
            for set_name, pairs in pair_sets.items():
                models[name][set_name] = minimal_pairs(token_logits, tok, pairs, cfg, device)
    return models

def collect_results(cfg, models, dict_info, times, tasks, world, teacher_info, student_info, head_info, baseline_info):
    """Everything the report shows, as saved in results.json; models gets each model's training seconds."""
    for name, seconds in [("teacher (MLM)", teacher_info["seconds"]), ("MLM baseline", baseline_info.get("seconds")),
                          ("MLSM student", student_info["seconds"]),
                          ("MLSM student + head", student_info["seconds"] + head_info["seconds"])]:
        if name in models:
            models[name]["seconds"] = seconds
    st, student_tokens = student_info["totals"], cfg.student_steps * cfg.batch_size * cfg.seq_len
    return {"models": models, "dictionary": dict_info,
            "student_zero_codes": st.get("zero_codes", 0) / max(st.get("masked", 0), 1),
            "student_unsolved_codes": st.get("unsolved_codes", 0),
            "tokens_seen": {"MLSM student": st.get("masked", 0),
                            "MLM baseline": baseline_info["totals"].get("masked", 0) if cfg.baseline else None},
            "majority_class": {t: float(np.bincount([y for *_, y in valid]).max() / len(valid))
                               for t, (_, valid) in tasks.items()},
            "mlsm_needs": {"teacher and dictionary seconds": teacher_info["seconds"] + dict_info["seconds"]},
            "curves": {"teacher": teacher_info.get("curve"),
                       "MLM baseline": cfg.baseline and baseline_info.get("curve"),
                       "MLSM student": student_info.get("curve"),  # student + head: after the student's tokens
                       "MLSM student + head": [{**p, "tokens": p["tokens"] + student_tokens}
                                               for p in head_info.get("curve") or []]},
            "seconds": times, "world_size": world, "config": dataclasses.asdict(cfg)}

# === Machinery: nothing below is needed to follow the method ======================================================
# Files, the BPE tokenizer, corpus reading, evaluation data, downloads, the command line, devices and processes,
# the toy language, the handout, the benchmark.
# --- Files --------------------------------------------------------------------------------------------------------
def atomic_write(path, write):
    """write(file) into a temporary file beside `path`, then rename it into place. subtle: os.replace is atomic, so
    after Ctrl-C or kill -9 `path` is the old file or the whole new one; the fsync makes it so on power loss too."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def save_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))

def load(path):
    """An artifact, read by its suffix; a damaged file becomes a UserError that says what to do."""
    readers = {".pt": lambda p: torch.load(p, map_location="cpu", weights_only=True),
               ".json": lambda p: json.loads(Path(p).read_text()), ".npy": np.load, ".npz": lambda p: dict(np.load(p))}
    try:
        return readers[Path(path).suffix](path)
    except Exception as e:  # torch, numpy and json raise many different types for a bad file
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); "
                        f"delete it, or re-run with --fresh") from None

# --- Stage 1: byte-level BPE tokenizer ----------------------------------------------------------------------------
# Text is first split into pre-tokens (a word with its leading space, a number, a run of punctuation,
# whitespace), as in GPT-2, so merges never cross word boundaries. The alternatives cover every character, so
# concatenating the pre-tokens gives back the text exactly.
PRETOKEN = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")

def merge_pair(ids, pair, new_id):
    """Replace every non-overlapping occurrence of `pair`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out

class Tokenizer:
    def __init__(self, merges):
        self.merges = [tuple(p) for p in merges]
        self.rank = {p: N_SPECIAL + 256 + i for i, p in enumerate(self.merges)}  # pair -> new id
        self.bytes = [s.encode() for s in SPECIALS] + [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.bytes.append(self.bytes[a] + self.bytes[b])
        self.vocab_size, self.cache = len(self.bytes), {}  # cache: pre-token -> ids

    @classmethod
    def train(cls, texts, vocab_size):
        """Learn merges until the vocabulary has vocab_size entries (or no pair occurs twice).

        Incremental: pair counts are kept up to date by touching only the words that contain the
        merged pair, and a heap with lazy deletion finds the most frequent pair, so each merge
        costs time in proportion to the words it changes, not to the corpus."""
        counts = Counter(w for text in texts for w in PRETOKEN.findall(text))
        words = [[N_SPECIAL + b for b in w.encode("utf-8", "surrogatepass")] for w in counts]
        freqs = list(counts.values())
        pairs, where = Counter(), defaultdict(set)  # pair -> count, pair -> indices of words
        for i, w in enumerate(words):
            for p in zip(w, w[1:]):
                pairs[p] += freqs[i]
                where[p].add(i)
        heap = [(-c, p) for p, c in pairs.items()]  # ties go to the smallest pair: deterministic
        heapq.heapify(heap)
        merges = []
        for new_id in tqdm(range(N_SPECIAL + 256, vocab_size), desc="BPE merges", mininterval=1):
            while heap:
                c, best = heapq.heappop(heap)
                if -c == pairs.get(best, 0):  # subtle: skip entries left behind by count changes
                    break
            else:
                break
            if -c < 2:
                break
            merges.append(best)
            changed = set()
            for i in where.pop(best):
                w = words[i]
                new = merge_pair(w, best, new_id)
                if len(new) == len(w):  # the word lost this pair in an earlier merge
                    continue
                for p in zip(w, w[1:]):
                    pairs[p] -= freqs[i]
                    changed.add(p)
                for p in zip(new, new[1:]):
                    pairs[p] += freqs[i]
                    where[p].add(i)
                    changed.add(p)
                words[i] = new
            for p in changed:
                if pairs[p] > 0:
                    heapq.heappush(heap, (-pairs[p], p))
        return cls(merges)

    def encode_word(self, word):
        """One pre-token -> ids, applying merges in the order they were learned."""
        ids = self.cache.get(word)
        if ids is None:
            ids = [N_SPECIAL + b for b in word.encode("utf-8", "surrogatepass")]
            while len(ids) > 1:
                pair = min(zip(ids, ids[1:]), key=lambda p: self.rank.get(p, math.inf))
                if pair not in self.rank:
                    break
                ids = merge_pair(ids, pair, self.rank[pair])
            self.cache[word] = ids
        return ids

    def encode(self, text):
        return [i for w in PRETOKEN.findall(text) for i in self.encode_word(w)]

    def decode(self, ids):
        data = b"".join(self.bytes[i] for i in ids)
        try:  # surrogatepass: even a str holding lone surrogates survives encode -> decode
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:  # ids that split a character, e.g. one token shown alone
            return data.decode("utf-8", errors="replace")

    def save(self, path):
        save_json(path, {"merges": self.merges})

    @classmethod
    def load(cls, path):
        return cls(load(path)["merges"])

# --- Stage 2: the corpus, packed into rows ------------------------------------------------------------------------
def find_corpus(path):
    """A file or directory -> (train files, dev files). Dev: *.dev files or files under dev/."""
    path = Path(path)
    if path.is_file():
        return [path], []
    if not path.is_dir():
        raise UserError(f"--data {path} does not exist; give a text file or a folder of *.train / *.txt files")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".train", ".txt", ".dev"))
    dev = [p for p in files if p.suffix == ".dev" or "dev" in p.relative_to(path).parts[:-1]]
    train = [p for p in files if p not in dev]
    if not train:
        raise UserError(f"--data {path} holds no *.train or *.txt files")
    return train, dev

def read_text(path):
    """One file -> its non-blank lines joined by newlines; CRLF becomes LF, invalid UTF-8 bytes U+FFFD."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "\n".join(line.rstrip("\n") for line in f if line.strip())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None

def read_corpus(cfg):
    """--data -> (train texts, dev texts), one per file; --train_words cuts every train text to the same share."""
    train_files, dev_files = find_corpus(cfg.data)
    train = [read_text(p) for p in train_files]
    words = sum(len(t.split()) for t in train)
    if 0 < cfg.train_words < words:
        cuts = [t.find(" ", int(len(t) * cfg.train_words / words)) for t in train]
        train = [t[:c] if c >= 0 else t for t, c in zip(train, cuts)]
    return train, [read_text(p) for p in dev_files]

def pack(ids, seq_len):
    """A token stream (N,) -> rows (N', T) = [CLS] + T-2 tokens + [SEP]; a tail too short for a row is dropped."""
    n = len(ids) // (seq_len - 2)
    rows = np.asarray(ids[: n * (seq_len - 2)]).reshape(n, seq_len - 2)  # (N', T-2)
    return np.pad(rows, ((0, 0), (1, 1)), constant_values=(CLS, SEP))  # (N', T)

def encode_corpus(cfg, tok, train_texts, dev_texts):
    """Texts -> (train rows, dev rows); without dev texts, the last dev_fraction of each (every source in both)."""
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32  # halves the cache on disk
    ids = [np.array(tok.encode(text), dtype=dtype) for text in tqdm(train_texts + dev_texts, desc="encode")]
    train, dev = ids[: len(train_texts)], ids[len(train_texts):]
    if not dev_texts:
        cuts = [len(a) - math.ceil(cfg.dev_fraction * len(a)) for a in train]
        train, dev = [a[:c] for a, c in zip(train, cuts)], [a[c:] for a, c in zip(train, cuts)]
    return tuple(pack(np.concatenate(part or [np.zeros(0, dtype)]), cfg.seq_len) for part in (train, dev))

def make_rows(cfg, out):
    """Stages 1-2, unless a run before made them: tokenizer.json, train_ids.npy and dev_ids.npy, and their times."""
    times = load(out / "times.json") if (out / "times.json").exists() else {}
    t0 = time.time()
    made = all((out / name).exists() for name in ("tokenizer.json", "train_ids.npy", "dev_ids.npy"))
    texts = None if made else read_corpus(cfg)  # (train texts, dev texts): a file deleted by hand is made again
    if not (out / "tokenizer.json").exists():
        Tokenizer.train(texts[0], cfg.vocab_size).save(out / "tokenizer.json")
        times["tokenizer"] = time.time() - t0
    t0 = time.time()
    if texts:
        train_rows, dev_rows = encode_corpus(cfg, Tokenizer.load(out / "tokenizer.json"), *texts)
        atomic_write(out / "train_ids.npy", lambda f: np.save(f, train_rows))
        atomic_write(out / "dev_ids.npy", lambda f: np.save(f, dev_rows))
        times["encode"] = time.time() - t0
    save_json(out / "times.json", times)  # stage times survive a restart: stages done before are not re-timed

def load_rows(cfg, out):
    """-> (tokenizer, train rows (N, T), dev rows (N', T)), as stages 1-2 saved them."""
    tok = Tokenizer.load(out / "tokenizer.json")
    train_rows, dev_rows = load(out / "train_ids.npy"), load(out / "dev_ids.npy")
    print(f"data: {len(train_rows)} train rows, {len(dev_rows)} dev rows of {cfg.seq_len} tokens; vocabulary "
          f"{tok.vocab_size}")
    if len(train_rows) < cfg.batch_size or len(dev_rows) < 1:
        raise UserError(f"the corpus is too small: {len(train_rows)} train and {len(dev_rows)} dev rows of "
                        f"{cfg.seq_len} tokens for batches of {cfg.batch_size}; give more text or lower "
                        f"--seq_len / --batch_size")
    return tok, train_rows, dev_rows

# --- Evaluation data ----------------------------------------------------------------------------------------------
def read_jsonl(path, parse, what):
    """Each line of a .jsonl file through parse(dict) -> list; a bad line is a UserError naming it."""
    items = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        try:
            items.append(parse(json.loads(line)))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n} is not {what} ({e})") from None
    return items

def load_pairs(path):
    """BLiMP-style *.jsonl files (a folder or one file) -> {paradigm (UID, else file name): [(good, bad)]}."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise UserError(f"no *.jsonl minimal pairs at {path}")
    pairs = {}
    for f in files:
        parse = lambda d: (d.get("UID", f.stem), (str(d["sentence_good"]), str(d["sentence_bad"])))
        for uid, pair in read_jsonl(f, parse, "a minimal pair with sentence_good and sentence_bad"):
            pairs.setdefault(uid, []).append(pair)
    return pairs

TASK_FORMATS = [
    (("sentence1",), lambda d: (d["sentence1"], d.get("sentence2") or "")),  # MRPC, RTE
    (("premise", "hypothesis"), lambda d: (d["premise"], d["hypothesis"])),  # MNLI
    (("question1", "question2"), lambda d: (d["question1"], d["question2"])),  # QQP
    (("paragraph", "question", "answer"), lambda d: (f"{d['question']} {d['answer']}", d["paragraph"])),  # MultiRC
    (("question", "passage"), lambda d: (d["question"], d["passage"])),  # BoolQ
    (("text", "span1_text", "span2_text"),  # WSC: does the pronoun (span 2) refer to span 1?
     lambda d: (d["text"], f"{d['span2_text']}: {d['span1_text']}")),
]

def task_example(item):
    """One parsed jsonl line -> (segment 1, segment 2, label); KeyError for an unknown format."""
    for fields, segments in TASK_FORMATS:
        if all(f in item for f in fields):
            return (*map(str, segments(item)), int(item["label"]))
    raise KeyError(f"none of the known field sets {[f for f, _ in TASK_FORMATS]}")

def load_tasks(path, only=""):
    """<task>.train.jsonl / <task>.valid.jsonl in BabyLM's (Super)GLUE formats (TASK_FORMATS), of the tasks in
    only ('': all) -> {task: (train, valid)}, each a list of (s1, s2, label 0..n-1)."""
    tasks, only = {}, [t for t in only.split(",") if t]
    for t in only:
        if not (Path(path) / f"{t}.train.jsonl").exists():
            raise UserError(f"--tasks {t}: {path} holds no {t}.train.jsonl")
    for train_file in sorted(Path(path).glob("*.train.jsonl")):
        task = train_file.name.removesuffix(".train.jsonl")
        if only and task not in only:
            continue
        valid_file = train_file.with_name(f"{task}.valid.jsonl")
        if not valid_file.exists():
            raise UserError(f"{valid_file} is missing: each <task>.train.jsonl needs a <task>.valid.jsonl")
        what = "an example of a known task format with an integer label"
        tasks[task] = tuple(read_jsonl(f, task_example, what) for f in (train_file, valid_file))
    if not tasks:
        raise UserError(f"no <task>.train.jsonl files in {path}")
    return tasks

def read_evaluation_data(cfg):
    """-> ({"BLiMP": pairs, "supplement": pairs}, tasks), read before training: a bad file stops the run early."""
    pair_sets = {}
    if cfg.blimp:
        pair_sets["BLiMP"] = {k: v[: cfg.blimp_pairs or None] for k, v in load_pairs(cfg.blimp).items()}
    if cfg.supplement:
        pair_sets["supplement"] = load_pairs(cfg.supplement)
    return pair_sets, load_tasks(cfg.finetune, cfg.tasks) if cfg.finetune else {}

# --- Downloads ----------------------------------------------------------------------------------------------------
# The default data, downloaded when missing: BabyLM 2024 strict-small from OSF, checked by its MD5; BabyLM's
# evaluation data (on OSF inside archives, osf.io/ryjfm) from a public copy pinned to one commit, BLiMP checked by
# the SHA-256 of its files' `sha256sum` listing, each (Super)GLUE file by its git blob id.
CORPUS_URL, CORPUS_MD5 = "https://osf.io/download/5mk3x/", "dc67e5d2db96ed4f76cb072e2504a18c"  # train_10M.zip
EVAL_URL = ("https://raw.githubusercontent.com/moritzlad/BabyLM-Tiny/5d8931cb303862fda223979427a87eb97ce223d3/"
            "evaluation_data")
# BLiMP as BabyLM evaluates it ("fast": 200 of the 1,000 pairs of each of the 67 paradigms)
BLIMP_URL = f"{EVAL_URL}/fast_eval/blimp_fast"
BLIMP_SHA256 = "6a4a3fddedf89ffe6b6581fb7357e3c4cd703136a86abde66ee763a0503916fe"
BLIMP_PARADIGMS = """adjunct_island anaphor_gender_agreement anaphor_number_agreement animate_subject_passive
animate_subject_trans causative complex_NP_island coordinate_structure_constraint_complex_left_branch
coordinate_structure_constraint_object_extraction determiner_noun_agreement_1 determiner_noun_agreement_2
determiner_noun_agreement_irregular_1 determiner_noun_agreement_irregular_2 determiner_noun_agreement_with_adj_2
determiner_noun_agreement_with_adj_irregular_1 determiner_noun_agreement_with_adj_irregular_2
determiner_noun_agreement_with_adjective_1 distractor_agreement_relational_noun distractor_agreement_relative_clause
drop_argument ellipsis_n_bar_1 ellipsis_n_bar_2 existential_there_object_raising existential_there_quantifiers_1
existential_there_quantifiers_2 existential_there_subject_raising expletive_it_object_raising inchoative intransitive
irregular_past_participle_adjectives irregular_past_participle_verbs irregular_plural_subject_verb_agreement_1
irregular_plural_subject_verb_agreement_2 left_branch_island_echo_question left_branch_island_simple_question
matrix_question_npi_licensor_present npi_present_1 npi_present_2 only_npi_licensor_present only_npi_scope passive_1
passive_2 principle_A_c_command principle_A_case_1 principle_A_case_2 principle_A_domain_1 principle_A_domain_2
principle_A_domain_3 principle_A_reconstruction regular_plural_subject_verb_agreement_1
regular_plural_subject_verb_agreement_2 sentential_negation_npi_licensor_present sentential_negation_npi_scope
sentential_subject_island superlative_quantifiers_1 superlative_quantifiers_2 tough_vs_raising_1 tough_vs_raising_2
transitive wh_island wh_questions_object_gap wh_questions_subject_gap wh_questions_subject_gap_long_distance
wh_vs_that_no_gap wh_vs_that_no_gap_long_distance wh_vs_that_with_gap wh_vs_that_with_gap_long_distance""".split()
# BabyLM's filtered (Super)GLUE tasks, train and validation splits, each file pinned by its git blob id
GLUE_URL = f"{EVAL_URL}/full_eval/glue_filtered"
GLUE_BLOBS = {f"{task}.{split}.jsonl": blob for task, train, valid in [
    ("boolq", "2db706a23e48d0ba8ea2c309ebc8092764d14d32", "0a39eacb6104879c0845bdc44edafbfa3faf5787"),
    ("mnli", "c3411ab35738bafbd2a68f4b1475418836a99b57", "5d71ded07f0f7e1952dda4c4a44d178529cb3401"),
    ("mrpc", "b42a6206cdcf17c4f250e21c2386aa8e799c261f", "dc8073610a4daad7ad0fd7cc4568bad133ac6f26"),
    ("multirc", "9aaf9a8b39a67a5a991bcebdf7fb1895b775a64f", "3b9529f7bc54b716fef21398cfe708f10e412d0d"),
    ("qqp", "b7e40e565c785e234ca668d12ace487b186fa7a4", "8dc54c84e7183e34ce564d7e2cb8a272e0302671"),
    ("rte", "89d43d1ab49c063392a164c7f7bd1bbab42f114e", "71802211dbdeaa58ac7cc8e3113cbdc2dfc32501"),
    ("wsc", "d111628103f7c7f15d680eda2ecafea1f68ac70d", "ac099d27b57cb3f9a4e23cb1d434f08c15785025")]
    for split, blob in (("train", train), ("valid", valid))}

def unzip(folder):
    """The downloaded corpus archive -> its *.train files, directly in `folder`."""
    archive = next(folder.glob("*.zip"))
    try:  # subtle: like zipfile's extractall, it skips members with absolute paths or ".." in them
        shutil.unpack_archive(archive, folder / "unzipped")
    except shutil.ReadError as e:
        raise UserError(f"the download is not a valid zip ({e})") from None
    for p in (folder / "unzipped").rglob("*.train"):
        p.rename(folder / p.name)
    archive.unlink()
    shutil.rmtree(folder / "unzipped")
    if not any(folder.glob("*.train")):
        raise UserError("the archive holds no *.train files")

def file_digest(path, algorithm):
    """A file's hex digest. "git": its git blob id, the SHA-1 of b"blob <size>\\0" + content, which is
    what a repository's tree records for it (and `git hash-object FILE` prints)."""
    h = hashlib.new("sha1" if algorithm == "git" else algorithm)
    if algorithm == "git":
        h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

def download(dest, files, digest, option, algorithm="sha256"):
    """Download {name: url} into a temporary folder beside `dest`, check them -- `digest` a dict: each
    file's own digest; a string: the one file's digest, or of several the SHA-256 of their `sha256sum`
    listing, in this order -- let the reader of --option parse them, then move them into place: a
    failed download leaves nothing. Files for a `dest` that exists are added to it."""
    check = {"data": unzip, "blimp": load_pairs, "finetune": load_tasks}[option]
    dest, urls = Path(dest), list(files.values())
    pins = ("each by its git blob id (`git hash-object FILE`; the ids are in mlsm.py)" if isinstance(digest, dict)
            else f"{algorithm} {digest}" if len(files) == 1 else f"the sha256 of their sha256sum listing: {digest}")
    where = urls[0] if len(urls) == 1 else os.path.commonprefix(urls).rsplit("/", 1)[0] + "/"
    what = "the unzipped *.train files" if option == "data" else "them"
    manual = (f"get {'it' if len(files) == 1 else f'the {len(files)} files ({next(iter(files))}, ...)'} by hand from "
              f"{where}, check {pins}, put {what} into {dest}, or pass another folder as --{option}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        folder = Path(tmp) / dest.name
        folder.mkdir()
        for name, url in tqdm(files.items(), desc=f"download {dest.name}"):
            try:
                with urllib.request.urlopen(url, timeout=60) as r, open(folder / name, "wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
            except (OSError, http.client.HTTPException) as e:  # URLError is an OSError; a cut-off body, IncompleteRead
                raise UserError(f"could not download {name} ({e}); {manual}") from None
        if isinstance(digest, dict):
            bad = [name for name in files if file_digest(folder / name, "git") != digest[name]]
        else:
            listing = "".join(f"{file_digest(folder / name, algorithm)}  {name}\n" for name in files)
            got = listing.split()[0] if len(files) == 1 else hashlib.sha256(listing.encode()).hexdigest()
            bad = [] if got == digest else [f"{algorithm} {got}, expected {digest}"]
        if bad:
            raise UserError(f"the files are damaged or not the pinned ones ({', '.join(bad)}); {manual}")
        try:
            check(folder)  # a file that does not parse fails here, with its name and line
        except UserError as e:
            raise UserError(f"{str(e).replace(str(folder), str(dest))}; {manual}") from None
        if dest.exists():  # new files for a folder that exists
            for p in folder.iterdir():
                os.replace(p, dest / p.name)
        else:
            os.replace(folder, dest)

def fetch_missing(cfg):
    """Check the user's own paths first (a typo is reported at once), then download the default corpus, BLiMP and
    (Super)GLUE tasks where the options name them and they are missing."""
    tasks = cfg.tasks.split(",") if cfg.tasks else [n.split(".")[0] for n in GLUE_BLOBS]
    glue = {n: f"{GLUE_URL}/{n}" for n in GLUE_BLOBS
            if n.split(".")[0] in tasks and not (Path(cfg.finetune) / n).exists()}
    downloads = {"data": ({"train_10M.zip": CORPUS_URL}, CORPUS_MD5, "md5"),
                 "blimp": ({f"{p}.jsonl": f"{BLIMP_URL}/{p}.jsonl" for p in BLIMP_PARADIGMS}, BLIMP_SHA256, "sha256"),
                 "finetune": (glue, GLUE_BLOBS, "git")}
    wanted = [o for o in downloads if getattr(cfg, o) == getattr(Config, o)
              and (not Path(getattr(cfg, o)).exists() or o == "finetune" and glue)]
    if cfg.data == PRESETS["toy"]["data"] and not Path(cfg.data).exists():
        write_toy_language(cfg.data)
    for name in ("data", "blimp", "supplement", "finetune"):
        path = getattr(cfg, name)
        if path and name not in wanted and not Path(path).exists():
            raise UserError(f"--{name} {path} does not exist")
    if "data" not in wanted:
        find_corpus(cfg.data)  # a folder without text stops the run before any download
    for name in wanted:
        download(getattr(cfg, name), *downloads[name][:2], name, downloads[name][2])

# --- The run directory --------------------------------------------------------------------------------------------
ARTIFACTS = ["config.json", "tokenizer.json", "train_ids.npy", "dev_ids.npy", "dictionary.npz", "results.json",
             "times.json", "concepts.json", "finetune.json"]
ARTIFACTS += [f"{m}{x}" for m in ("teacher", "student", "head", "baseline") for x in (".pt", ".ckpt.pt")]

def prepare_out(cfg):
    """Create --out, or check that the artifacts in it were made by the same config."""
    out = Path(cfg.out)
    if cfg.fresh:
        for name in ARTIFACTS + [p.name for p in out.glob("finetune_*")]:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    want = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}
    want["data"] = str(Path(cfg.data).resolve())
    if (out / "config.json").exists():
        have = load(out / "config.json")
        diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        if diff:
            raise UserError(f"{out} holds a run with a different config ({', '.join(diff)}); "
                            f"use another --out, or --fresh to delete that run")
    else:
        save_json(out / "config.json", want)

# --- The command line ---------------------------------------------------------------------------------------------
LIMITS = [
    ("teacher_steps student_steps head_steps dict_epochs finetune_steps train_words blimp_pairs curve_pairs "
     "mlm_weight weight_decay micro_batch", lambda v: v >= 0, "must not be negative"),
    ("seq_len d_model n_layers n_heads batch_size n_concepts dict_tokens coder_rounds eval_rows log_every ckpt_every "
     "finetune_seeds curve_points", lambda v: v >= 1, "must be at least 1"),
    ("lr head_lr lam finetune_lr clip", lambda v: v > 0, "must be positive"),
    ("mask_rate beta2 self_every", lambda v: 0 < v < 1, "must be in (0, 1)"),
    ("dropout dev_fraction warmup", lambda v: 0 <= v < 1, "must be in [0, 1)"),
]

def parse_config(argv=None):
    """Command line -> Config: preset values first, then the flags given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def error(message):  # one line, as every other mistake gets
        raise UserError(message)
    parser.error = error
    for f in dataclasses.fields(Config):
        # every default in the help, with the presets' own values; SUPPRESS keeps flags not given
        # out of the parsed namespace, so the preset's value is used for them
        presets = "".join(f"; {p}: {v[f.name]!r}" for p, v in PRESETS.items() if f.name in v)
        kw = dict(help=f"{f.metadata['help']} (default: {f.default!r}{presets})".replace("%", "%%"),
                  default=argparse.SUPPRESS)
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(f"--{f.name}", type=f.type, choices=f.metadata["choices"], **kw)
    given = vars(parser.parse_args(argv))
    preset = given.get("preset", Config.preset)
    cfg = Config(**{**PRESETS[preset], **given})
    cfg.out = cfg.out or f"runs/{preset}"
    problems = [f"--{name} {what}, got {getattr(cfg, name)}" for names, ok, what in LIMITS
                for name in names.split() if not ok(getattr(cfg, name))]
    problems += [what for failed, what in [
        (cfg.vocab_size < N_SPECIAL + 256, f"--vocab_size must be at least {N_SPECIAL + 256} (4 special tokens + "
                                           f"256 bytes), got {cfg.vocab_size}"),
        (cfg.teacher_layer != -1 and not 1 <= cfg.teacher_layer <= cfg.n_layers,
         f"--teacher_layer must be -1 or in 1..{cfg.n_layers}, got {cfg.teacher_layer}"),
        (cfg.seq_len < 3, f"--seq_len must be at least 3 ([CLS], a token, [SEP]), got {cfg.seq_len}"),
        (cfg.dict_jobs == 0 or cfg.dict_jobs < -1, f"--dict_jobs must be -1 or at least 1, got {cfg.dict_jobs}"),
        (cfg.d_model % max(cfg.n_heads, 1), f"--d_model {cfg.d_model} must be divisible by --n_heads {cfg.n_heads}"),
        (cfg.targets == "tokens" and cfg.teacher == "self", "--targets tokens needs a teacher (--teacher separate)"),
    ] if failed]
    if problems:
        raise UserError("; ".join(problems))
    return cfg

# --- Devices and processes ----------------------------------------------------------------------------------------
def pick_device(name):
    """--device -> a torch.device, checked to be usable with this torch."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    mps = name.startswith("mps")
    need = "2.10" if mps else "2.4"  # on MPS, the sparse coder's embedding_bag needs 2.10
    if torch.__version__ < need:
        raise UserError(f"mlsm.py on {name} needs torch {need} or newer, and this is torch {torch.__version__}: "
                        f"pip install --upgrade 'torch>={need}'" + (", or run on the CPU: --device cpu" if mps else ""))
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"--device {name} is not usable here ({e})") from None
    return device

def join_processes(cfg):
    """-> this process's device; under torchrun also the process group (NCCL on GPUs, else gloo). Only rank 0
    prints; the others keep stderr, so that a failing rank says why."""
    device = pick_device(cfg.device)
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # rank 0 may work alone for a long time (dictionary, evaluation) while the others wait
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    if cfg.batch_size % dist.get_world_size():
        raise UserError(f"--batch_size {cfg.batch_size} must be divisible by the {dist.get_world_size()} processes")
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return device

def step_dtype(name, device):
    """--dtype -> the autocast dtype of a training step (float32: no autocast). subtle: a GPU without
    bf16 units (T4, V100, RTX 20) emulates it slowly, so auto asks for native support only."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        name = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]

def sync(device):
    """Wait until the device has finished its queued work (a GPU runs behind the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()

def barrier():
    """Wait for every process (under torchrun; nothing otherwise)."""
    if dist.is_initialized():
        dist.barrier()

def to_device(t, device):
    """A host tensor on the device. To a CUDA GPU from pinned memory and without waiting: the copy overlaps with
    compute. subtle: nowhere else -- on Apple's MPS a non-blocking copy may read its source after it is freed."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

@contextlib.contextmanager
def full_fp32_matmuls():
    """Full-fp32 matrix products inside the block, whatever the user allowed outside it (TF32 on a GPU, bf16 on a
    CPU keep too few bits for the coder's optimality test), and afterwards exactly what they had.
    subtle: torch 2.9 added per-backend settings beside the global one and refuses a matmul when the two
    disagree; torch.set_float32_matmul_precision sets both, so it is the one switch used here."""
    per_backend = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul] \
        if hasattr(torch.backends.cuda.matmul, "fp32_precision") else []  # torch >= 2.9
    saved = [b.fp32_precision for b in per_backend]
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # unreadable once the per-backend settings were used, which leave it at its default
        legacy = "highest"
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        for b, precision in zip(per_backend, saved):
            b.fp32_precision = precision

def warn_if_slow(cfg, n_params, device):
    """On a CPU with the GPU-sized default, estimate the time from a matmul measured now."""
    if device.type != "cpu" or cfg.preset != "laptop" or shard()[0] > 0:
        return
    a = torch.randn(1024, 1024)
    flops = 2 * 1024 ** 3 / wall(lambda: a @ a, device, 4)  # wall: Machinery, benchmark
    student = 1.3 + cfg.baseline  # a student step plus a teacher forward; the MLM baseline's step
    tokens = (cfg.teacher_steps + student * cfg.student_steps + 0.4 * cfg.head_steps) * cfg.batch_size * cfg.seq_len
    hours = 6 * n_params * tokens / (0.5 * flops) / 3600  # training ~ 6 FLOPs per parameter per token
    print(f"warning: the laptop preset on this CPU would take about {hours:.0f} hours (estimate from a "
          f"{flops / 1e9:.0f} GFLOP/s matmul); --preset cpu runs the whole pipeline in about 40 minutes on 2 cores",
          file=sys.stderr)

# --- The toy language (--preset toy): a small grammar whose word classes are known --------------------------------
TOY_WORDS = {
    "animal": ["dog", "cat", "horse", "bird", "cow", "goat", "duck", "fox"],
    "food": ["apple", "bread", "cake", "egg", "pear", "plum", "bean", "nut"],
    "tool": ["hammer", "saw", "drill", "brush", "knife", "spoon", "rope", "key"],
    "adjective": ["big", "small", "red", "old", "young", "happy", "green", "soft"],
}
TOY_OBJECTS = {"eat": ["food"], "like": ["food", "animal"], "use": ["tool"], "hold": ["tool", "food"]}
TOY_INTRANSITIVE = ["sleep", "run", "sing", "jump"]

def toy_sentence(rng):
    """A sentence (list of words): an animal subject that agrees with its verb, the verb's kinds of object."""
    def noun_phrase(kind):
        plural = rng.random() < 0.5
        det = rng.choice(["some", "the", "two"] if plural else ["a", "the", "one"])
        adj = [rng.choice(TOY_WORDS["adjective"])] if rng.random() < 0.4 else []
        noun = rng.choice(TOY_WORDS[kind])
        return [det, *adj, noun + "s" if plural else noun], plural
    subject, plural = noun_phrase("animal")
    if rng.random() < 0.3:
        verb = rng.choice(TOY_INTRANSITIVE)
        return subject + [verb if plural else verb + "s", "."]
    verb = rng.choice(list(TOY_OBJECTS))
    obj, _ = noun_phrase(rng.choice(TOY_OBJECTS[verb]))
    return subject + [verb if plural else verb + "s"] + obj + ["."]

TOY_CLASS = {w + s: kind for kind, words in [*TOY_WORDS.items(), ("verb", [*TOY_OBJECTS, *TOY_INTRANSITIVE])]
             for w in words for s in ("", "s")} | dict.fromkeys(["a", "the", "one", "some", "two"], "det")

def toy_word_class(word):
    """A word's class: nouns by kind, adjective, verb (with or without -s), det (determiner), or other."""
    return TOY_CLASS.get(word, "other")

def toy_text(n, seed):
    rng = random.Random(seed)
    return "\n".join(" ".join(toy_sentence(rng)) for _ in range(n))

def toy_pairs(n, seed):
    """Minimal pairs in BLiMP's format: the verb agrees with its subject, or it does not."""
    rng, lines = random.Random(seed), []
    while len(lines) < n:
        words = toy_sentence(rng)
        i = next(i for i, w in enumerate(words) if toy_word_class(w) == "verb")
        wrong = words[i][:-1] if words[i].endswith("s") else words[i] + "s"
        bad = " ".join(words[:i] + [wrong] + words[i + 1:])
        lines.append(json.dumps({"sentence_good": " ".join(words), "sentence_bad": bad, "UID": "agreement"}))
    return "\n".join(lines)

def write_toy_language(folder):
    """--preset toy's data in folder: 20,000 training and 1,000 dev sentences, 200 agreement minimal pairs."""
    tmp = Path(folder).with_name(Path(folder).name + ".tmp")
    (tmp / "pairs").mkdir(parents=True, exist_ok=True)
    (tmp / "toy.train").write_text(toy_text(20000, 0))
    (tmp / "toy.dev").write_text(toy_text(1000, 1))
    (tmp / "pairs" / "agreement.jsonl").write_text(toy_pairs(200, 2))
    os.replace(tmp, folder)

# --- The classroom: python mlsm.py --handout DIR, the exercises' checks, --grade ----------------------------------
EXERCISE = re.compile(r"^( *)# BEGIN EXERCISE (\d+): (.*?)\n(.*?)(^ *# END EXERCISE \2\n)", re.M | re.S)
EXERCISES = {1: "normalise_states", 2: "active_set_one", 3: "fista", 4: "code_distribution", 5: "concept_kl",
             6: "mask_tokens", 7: "student_loss", 8: "make_head", 9: "SparseCoder", 10: "pseudo_log_likelihoods",
             11: "TokenTargets"}
# (exercise, week, points, the options of its toy runs, what to read in their output, the question to answer)
SHEET = [
    (1, 1, 5, ["--no-center"], "`dictionary:` non-zeros and error; the word-class AMIs",
     "What does centring change on the toy language? Why would it matter more for a real teacher's states?"),
    (2, 1, 15, ["--coder reference", "--coder_rounds 4"],
     "with `--coder reference` your coder codes every target: the AMIs, student + head; with 4 rounds: the "
     "unsolved targets",
     "How do the results of your coder compare with the batched one's? What do unfinished codes cost the student?"),
    (3, 1, 10, ["--coder fista"], "the FISTA codes that fail the optimality test; the AMIs; student + head",
     "Most FISTA codes are not optimal: does the student notice? When would it?"),
    (4, 1, 5, ["--lam 0.2"], "`dictionary:` non-zeros; the AMIs",
     "What does a sparser code keep, and what does it lose?"),
    (5, 1, 10, ["--student_steps 0"], "the student's AMI; student + head",
     "What does the untrained student's row show?"),
    (6, 1, 10, ["--mask_rate 0.4"], "teacher, MLM baseline and student + head in nats under unigram",
     "Who gains from more masking per step, and who loses?"),
    (7, 1, 5, ["--mlm_weight 1"], "student + head, the student's own token head, the baseline",
     "What does the joint loss buy this student, and what does it cost its concepts?"),
    (8, 1, 5, [""], "with `make_head` changed to `return nn.Linear(cfg.n_concepts, vocab_size)`: the first "
     "points of the student + head learning curve", "Why does the head start where it does?"),
    (9, 2, 25, ["--coder_rounds 16", "--coder_rounds 80"], "the unsolved targets; the student's AMI",
     "How many rounds do the toy's codes need, and why does a GPU run all of them?"),
    (10, 2, 15, ["--pll original"], "the minimal pairs (agreement) of every model",
     "When can a word's own pieces give it away, and does word_l2r change the toy's scores?"),
    (11, 2, 15, ["--targets tokens", ""],
     "student + head, and the distilled student's own token predictions (its row); minimal pairs; the AMIs",
     "Is MLSM more than distillation of the teacher's tokens?"),
]

class ExerciseFailure(AssertionError):
    """A check that failed, with what was expected and what came back (and a likely cause), no reference code."""

def summary(t):
    """A tensor in a few words: its shape and first values."""
    values = [round(v, 4) for v in t.detach().double().flatten()[:4].tolist()]
    return f"shape {tuple(t.shape)}, values {values}" + " ..." * (t.numel() > 4)

def compare(what, returned, expected, atol=1e-5, rtol=1e-4, causes=()):
    """Fail unless returned is close to expected; causes: [(test(returned), text)] of known mistakes."""
    returned = torch.as_tensor(returned).detach()
    expected = torch.as_tensor(expected).detach()
    if returned.shape == expected.shape and torch.allclose(returned.double(), expected.double(), rtol, atol):
        return
    message = f"{what}: expected {summary(expected)}; returned {summary(returned)}"
    if returned.shape == expected.shape:
        diff = (returned.double() - expected.double()).abs().nan_to_num(math.inf)
        where = [int(i) for i in np.unravel_index(int(diff.argmax()), diff.shape)]
        message += f"; largest difference {float(diff.max()):.3g} at {where}"
    causes = [text for test, text in causes if returned.shape == expected.shape and test(returned.double())]
    raise ExerciseFailure(message + "".join(f"\n  likely: {c}" for c in causes[:1]))

def require(ok, message):
    if not ok:
        raise ExerciseFailure(message)

def check_masking(m):
    """Exercise 6 needs no reference: its properties are the check."""
    ids = torch.arange(N_SPECIAL, N_SPECIAL + 30).repeat(8, 1)  # (8, 30)
    ids[:, 0], ids[:, -1] = CLS, SEP
    x, pos = m.mask_tokens(ids, 0.15, torch.Generator().manual_seed(0))
    require(tuple(pos.shape) == (8, 4), f"positions: expected shape (8, 4) -- m = max(1, round(0.15 * 28)) = 4 a row; "
                                        f"returned {tuple(pos.shape)}")
    require(bool(((pos >= 1) & (pos <= 28)).all()), "positions must lie in 1..T-2: [CLS] and [SEP] are never masked")
    require(all(len(set(r.tolist())) == 4 for r in pos), "the positions of a row must be distinct")
    masked = torch.zeros_like(ids, dtype=torch.bool).scatter(1, pos, True)
    require(bool((x[masked] == MASK).all() and (x[~masked] == ids[~masked]).all()),
            "every selected token becomes [MASK], and every other stays as it was")
    torch.manual_seed(1)
    again = m.mask_tokens(ids, 0.15, torch.Generator().manual_seed(0))[1]
    torch.manual_seed(2)
    other = m.mask_tokens(ids, 0.15, torch.Generator().manual_seed(1))[1]
    require(torch.equal(pos, again), "the same state of `gen` must give the same positions, whatever the global "
                                     "random state: draw with `generator=gen`")
    require(not torch.equal(pos, other), "another state of `gen` must give other positions")
    gen, counts = torch.Generator().manual_seed(3), torch.zeros(30)
    for _ in range(50):
        counts += torch.bincount(m.mask_tokens(ids, 0.15, gen)[1].flatten(), minlength=30)
    share = counts[1:-1] / counts.sum()  # each of the 28 positions: 1/28 expected, 1,600 draws
    require(float((share - 1 / 28).abs().max()) < 0.02, f"positions must be drawn uniformly from 1..T-2: shares from "
                                                          f"{float(share.min()):.3f} to {float(share.max()):.3f}")

def exercise_cases(m):
    """Every exercise check's inputs and the reference's outputs, computed with the full module m (this file)."""
    g, cfg, V = torch.Generator().manual_seed(0), m.parse_config(["--preset", "tiny", "--n_concepts", "16"]), 300
    common = torch.randn(16, generator=g)
    D = F.normalize(torch.randn(40, 16, generator=g) + 1.5 * common, dim=-1)  # (K, C): anisotropic, like states
    D = torch.cat([D, F.normalize(D[:8] + 0.003 * torch.randn(8, 16, generator=g), dim=-1)])  # near-duplicates
    X = F.normalize(torch.randn(24, 16, generator=g) + 1.5 * common, dim=-1)
    h, mean, A = torch.randn(6, 8, generator=g) + 2, torch.randn(8, generator=g), torch.rand(6, 9, generator=g)
    A = A * (A > 0.6)
    A[2] = 0  # a row without a distribution
    logits = 3 * torch.randn(6, 9, generator=g)
    rows = torch.randint(N_SPECIAL, V, (100, cfg.seq_len), generator=g).numpy()
    rows[:, 0], rows[:, -1] = CLS, SEP
    torch.manual_seed(0)
    model = m.build_encoder(cfg, V, 16)
    ids, x, pos = m.get_batch(rows, cfg, m.STUDENT_BATCHES, 0, torch.device("cpu"))
    with torch.no_grad():
        hs, p = model(x, pos=pos), m.code_distribution(torch.rand(len(pos.flatten()), 16, generator=g))[0]
        tok = m.Tokenizer([])  # bytes alone: every word in pieces, so that the two variants differ
        sentences = ["the dogs run", "a cat sleeps", "the cat runs away"]
        pll = {flag: m.pseudo_log_likelihoods(m.mlm_scorer(model.eval()), tok, sentences, cfg, "cpu", flag)
               for flag in (True, False)}
        return {1: dict(h=h, mean=mean, out=m.normalise_states(h, mean)),
                2: dict(X=X.double()[:12], D=D.double(), out=torch.stack([m.active_set_one(v, D.double(), 0.05)
                                                                          for v in X.double()[:12]])),
                3: dict(X=X, D=D, out=m.fista(X, D, 0.05)),
                4: dict(A=A, out=m.code_distribution(A)),
                5: dict(logits=logits, p=m.code_distribution(A)[0],
                        out=m.concept_kl(logits, m.code_distribution(A)[0])),
                7: dict(state=model.state_dict(), ids=ids, pos=pos, h=hs, p=p,
                        kl=m.concept_kl(model.concept_logits(hs), p),
                        out={w: m.student_loss(model, hs, p, ids, pos, dataclasses.replace(cfg, mlm_weight=w))
                             for w in (0.0, 0.5)}),
                8: dict(rows=rows, out=m.make_head(cfg, rows, V).state_dict()),
                9: dict(X=X, D=D, out=m.SparseCoder(D, 0.05).encode(X)),
                10: dict(state=model.state_dict(), merges=tok.merges, sentences=sentences, out=pll),
                11: dict(state=model.state_dict(), ids=ids, pos=pos, out=m.TokenTargets(model)(ids, pos)[0],
                         masked=m.TokenTargets(model)(x, pos)[0])}

def check_exercise(n, m, cases):
    """Exercise n of module m (a student's mlsm.py) against the reference's outputs -> None, or ExerciseFailure."""
    try:
        if n == 6:
            check_masking(m)
        elif n in (7, 8, 10, 11):
            check_model_exercise(n, m, cases[n], m.parse_config(["--preset", "tiny", "--n_concepts", "16"]))
        else:
            check_tensor_exercise(n, m, cases[n])
    except NotImplementedError:
        raise ExerciseFailure(f"exercise {n} ({EXERCISES[n]}) is not written yet") from None

def check_tensor_exercise(n, m, c):
    """The exercises that map tensors to tensors: 1-5 and 9."""
    if n == 1:
        compare("normalised states", m.normalise_states(c["h"], c["mean"]), c["out"], causes=[
            (lambda r: not torch.allclose(r.norm(dim=-1), torch.ones(len(r), dtype=r.dtype)), "rows of unit norm"),
            (lambda r: torch.allclose(r, F.normalize(c["h"].double(), dim=-1)), "subtract the mean first")])
    elif n == 2:
        A = torch.stack([m.active_set_one(v, c["D"], 0.05) for v in c["X"]])
        w = c["X"] @ c["D"].T - 0.05 - A @ (c["D"] @ c["D"].T)  # the negative gradient at the codes
        require(bool((A >= 0).all()), "codes must be >= 0")
        require(not torch.allclose(w[A > 0], torch.full_like(w[A > 0], -0.1), atol=1e-6), "the negative gradient "
                "on the support is -2 lam, not 0\n  likely: the sign of lam (b = x D^T - lam)")
        require(float(w.max()) < 1e-6, f"not optimal: an atom outside S would still lower the objective "
                                       f"(largest w = {float(w.max()):.2e})")
        compare("codes", A, c["out"], causes=[(lambda r: True, "on S the gradient is 0: solve G_SS z = b_S")])
    elif n == 3:
        compare("codes after FISTA's 100 steps", m.fista(c["X"], c["D"], 0.05), c["out"], atol=1e-4, causes=[
            (lambda r: bool((r < 0).any()), "project onto a >= 0 after each gradient step")])
    elif n == 4:
        p, valid = m.code_distribution(c["A"])
        compare("distributions", p, c["out"][0], causes=[
            (lambda r: bool(r.isnan().any()), "an all-zero code has no distribution: keep its row zero")])
        compare("valid", valid, c["out"][1])
    elif n == 5:
        M, with_target = len(c["p"]), int((c["p"].sum(-1) > 0).sum())
        compare("the KL loss", m.concept_kl(c["logits"], c["p"]), c["out"], causes=[
            (lambda r: r.isnan(), "0 log 0 is 0: a concept a target does not use adds nothing"),
            (lambda r: torch.isclose(r * c["p"].shape[1], c["out"].double()), "average over the M positions only, "
                                                                            "not over the concepts too"),
            (lambda r: torch.isclose(r * with_target / M, c["out"].double()), "a position without a target adds 0 "
                                                                             "but still counts in M")])
    elif n == 9:
        A, solved = m.SparseCoder(c["D"], 0.05).encode(c["X"])
        require(bool((A >= 0).all()), "codes must be >= 0: the drop move stops where a coefficient reaches 0")
        compare("which codes are solved", solved, c["out"][1])
        compare("codes", A, c["out"][0], atol=1e-4)

def check_model_exercise(n, m, c, cfg):
    """The exercises that need a model or a tokenizer: 7, 8, 10 and 11 (the model: its weights in the case)."""
    model = m.build_encoder(cfg, 300, 16).eval()
    if "state" in c:
        model.load_state_dict(c["state"])
    if n == 7:
        real, m.concept_kl = m.concept_kl, lambda logits, p: c["kl"]  # exercise 7 needs no exercise 5
        try:
            for w, expected in c["out"].items():
                compare(f"the student's loss with --mlm_weight {w}", m.student_loss(
                    model, c["h"], c["p"], c["ids"], c["pos"], dataclasses.replace(cfg, mlm_weight=w)), expected,
                    causes=[(lambda r: torch.isclose(r, c["kl"].double()), "add mlm_weight times L_MLM")])
        finally:
            m.concept_kl = real
    elif n == 8:
        head = m.make_head(cfg, c["rows"], 300)
        compare("the head's weights", head.weight, c["out"]["weight"], causes=[(lambda r: True, "W = 0")])
        compare("the head's bias", head.bias, c["out"]["bias"], causes=[
            (lambda r: bool(r.isinf().any()), "add one to every count (a token never seen)"),
            (lambda r: bool((r > 0).all()), "the log of the frequencies")])
    elif n == 10:
        tok = m.Tokenizer(c["merges"])
        for flag, expected in c["out"].items():
            compare(f"pseudo-log-likelihoods ({'word_l2r' if flag else 'original'})", m.pseudo_log_likelihoods(
                m.mlm_scorer(model), tok, c["sentences"], cfg, "cpu", flag), expected, atol=1e-4, causes=[
                (lambda r: flag and np.allclose(r, c["out"][False], atol=1e-4), "word_l2r also hides the later "
                                                                              "pieces of the scored token's word")])
    elif n == 11:
        compare("the teacher's token distributions", m.TokenTargets(model)(c["ids"], c["pos"])[0], c["out"],
                causes=[(lambda r: torch.allclose(r, c["masked"].double(), atol=1e-5),
                         "the teacher reads the unmasked rows"),
                        (lambda r: not torch.allclose(r.sum(-1), torch.ones(len(r), dtype=r.dtype)),
                         "a distribution: softmax of the token logits")])

def exercise_numbers(items):
    """--exercises '2,concept_kl' -> {2, 5}; 'week2' -> {9, 10, 11}; '' -> every exercise."""
    names = {key: {n} for n, name in EXERCISES.items() for key in (str(n), name)}
    names |= {f"week{w}": {n for n, week, *_ in SHEET if week == w} for w in (1, 2)}
    chosen = set()
    for item in filter(None, (i.strip() for i in items.split(","))):
        if item not in names:
            listed = ", ".join(f"{n} {name}" for n, name in EXERCISES.items())
            raise UserError(f"--exercises {item}: the exercises are {listed}; week1 is 1-8, week2 9-11")
        chosen |= names[item]
    return chosen or set(EXERCISES)

def write_handout(folder, exercises=""):
    """A student's folder: mlsm.py with the chosen exercises' bodies replaced by their comments and raise
    NotImplementedError (signatures and docstrings stay), the checks (test_exercises.py, expected.pt: the
    reference's outputs, not its code), pytest.ini, and the sheet, EXERCISES.md -- no answers."""
    src, chosen, folder = Path(__file__).read_text(), exercise_numbers(exercises), Path(folder)

    def blank(match):
        indent, n, title, body, end = match.groups()
        if int(n) not in chosen:
            return match.group(0)
        hints = [c.group(1) for c in map(re.compile(r"(?:^ *|  )# (.*)$").search, body.splitlines()) if c]
        return "".join(f"{indent}# {line}\n" for line in [f"BEGIN EXERCISE {n}: {title}", *hints]) + \
            f'{indent}raise NotImplementedError("exercise {n}: {title}")\n{end}'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mlsm.py").write_text(EXERCISE.sub(blank, src))
    torch.save(exercise_cases(sys.modules[__name__]), folder / "expected.pt")
    (folder / "pytest.ini").write_text("[pytest]\naddopts = -q --tb=short -p no:cacheprovider\n")
    (folder / "test_exercises.py").write_text(
        '"""The exercises\' checks: python -m pytest -k exercise5 checks exercise 5; python -m pytest, all."""\n'
        "from pathlib import Path\n\nimport pytest\nimport torch\n\nimport mlsm\n\n"
        'CASES = torch.load(Path(__file__).parent / "expected.pt", weights_only=False)\n\n\n'
        f"@pytest.mark.parametrize(\"n\", {sorted(chosen)}, ids=lambda n: f\"exercise{{n}}\")\n"
        "def test_exercise(n):\n    mlsm.check_exercise(n, mlsm, CASES)\n")
    runs = lambda n, options: ", then ".join(f"`python mlsm.py --preset toy {o} --out runs/ex{n}"
                                           f"{'abc'[i] if len(options) > 1 else ''}`".replace("  ", " ")
                                           for i, o in enumerate(options))
    rows = [f"| {n} | {w} | {pts} | `{EXERCISES[n]}` | {runs(n, options)} | {read} | {question} |"
            for n, w, pts, options, read, question in SHEET if n in chosen]
    (folder / "EXERCISES.md").write_text(SHEET_TEXT.format(table="\n".join(rows), first=min(chosen)))
    print(f"wrote {folder}: mlsm.py with exercises {', '.join(map(str, sorted(chosen)))} to write, their checks "
          f"(cd {folder} && python -m pytest -k exercise{min(chosen)}) and the sheet, EXERCISES.md")

SHEET_TEXT = """# Exercises: Masked Latent Semantic Modeling

`mlsm.py` is the whole pipeline with the body of each exercise below left to write: its signature, docstring
and comments stay, and `raise NotImplementedError` marks what is missing. Read the docstring and the comments
of the section around it (the file reads top to bottom), write the body, then check it:

```bash
python -m pytest -k exercise{first}   # one exercise's check, a few seconds
python -m pytest                 # all of them
```

A check compares what your code returns with the reference's outputs for the same inputs (`expected.pt`) and
says what it expected, what came back and, for a common mistake, what it probably is. Each exercise's check
needs no other exercise; the pipeline runs once all of them are written.

Then run the experiment of the exercise and answer its question in a few sentences, with the numbers you saw.
Compare with the toy preset as it is, `python mlsm.py --preset toy` (saved in `runs/toy`). A run takes about
a minute on 2 CPU cores (longer on a shared machine; `--coder reference` a few minutes); `--seed 1` and
`--seed 2` show how much a number moves. Each command below saves its work in its own `--out` folder (a
folder holds one configuration; `--fresh` deletes what it holds). To rerun only the student after changing its
code, copy the folder of a finished run and delete `student.pt`, `head.pt`, `baseline.pt` and `results.json`
in the copy: its teacher and dictionary are reused.

Hand in your `mlsm.py` and your answers. Week 1: exercises 1-8; week 2: 9-11 (harder: the batched coder's two
moves, the scores of minimal pairs, and a control experiment). The runs need every exercise in this folder
written: the pipeline calls them all.

| # | week | points | write | then run | read | answer |
|---|---|---|---|---|---|---|
{table}
"""

def grade(paths):
    """--grade: every student copy (a mlsm.py or a folder holding one; comma-separated, globs allowed) through
    every exercise's check -> a table, one row a student, one column an exercise, and the total."""
    import glob
    import importlib.util
    import signal

    cases, copies = exercise_cases(sys.modules[__name__]), sorted({Path(p) for item in paths.split(",")
                                                                   for p in glob.glob(item.strip())})

    def too_long(*_):
        raise TimeoutError
    alarm = signal.alarm if hasattr(signal, "SIGALRM") else lambda seconds: None  # no SIGALRM on Windows
    if hasattr(signal, "SIGALRM"):  # a check that runs for a minute has failed (an endless loop)
        signal.signal(signal.SIGALRM, too_long)
    if not copies:
        raise UserError(f"--grade {paths}: no such files or folders")
    points = {n: pts for n, _, pts, *_ in SHEET}
    print(f"{'student':<40}" + "".join(f"{n:>6}" for n in EXERCISES) + f"{'points':>10}")
    for i, path in enumerate(copies):
        file, passed = path / "mlsm.py" if path.is_dir() else path, {}
        try:
            spec = importlib.util.spec_from_file_location(f"student{i}", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as e:  # a copy that does not even import fails every check
            print(f"{str(path)[-40:]:<40}  does not import ({type(e).__name__}: {e})"[:120])
            continue
        for n in EXERCISES:
            alarm(60)
            try:
                check_exercise(n, module, cases)
                passed[n] = True
            except Exception:
                passed[n] = False
            finally:
                alarm(0)
        total = sum(points[n] for n, ok in passed.items() if ok)
        print(f"{str(path)[-40:]:<40}" + "".join(f"{'pass' if passed[n] else 'fail':>6}" for n in EXERCISES)
              + f"{total:>6}/{sum(points.values())}")

# --- Benchmark: python mlsm.py --bench measures every stage at the preset's sizes -> bench.json -------------------
def wall(fn, device, repeat=1):
    """Seconds per call of fn(), after one warm-up call, waiting for the device to finish."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat

def timed(fn):
    """-> (fn(), its seconds): for work too long to repeat."""
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0

def step_flops(model, cfg, masked):
    """FLOPs of one training step = 3 x forward (the backward pass costs twice the forward):
    2 per weight per token in the blocks -- in the last block, all but qkv only at the `masked`
    positions -- 4 T C per token per layer for attention's two T x T products, and 2 per weight
    of the head at each masked position."""
    tokens = cfg.batch_size * cfg.seq_len
    layer = sum(p.numel() for p in model.blocks[-1].parameters() if p.dim() == 2)
    qkv = model.blocks[-1].attn.qkv.weight.numel()
    blocks = (cfg.n_layers - 1) * layer * tokens + qkv * tokens + (layer - qkv) * masked
    if model.concept_head is None:
        head = model.mlm_transform[0].weight.numel() + model.tok_emb.weight.numel()
    else:
        head = sum(p.numel() for p in model.concept_head.parameters() if p.dim() == 2)
    return 3 * (2 * blocks + 4 * cfg.seq_len * cfg.d_model * cfg.n_layers * tokens + 2 * head * masked)

def bench(cfg):
    """Speeds of every stage at cfg's sizes; with a finished run's teacher and dictionary in --out, the real ones."""
    import resource

    device, out = pick_device(cfg.device), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, ckpt_every=10 ** 9, log_every=10 ** 9)  # no checkpoints, no syncs
    dtype = step_dtype(cfg.dtype, device)
    r = {"device": str(device), "torch_threads": torch.get_num_threads(), "preset": cfg.preset,
         "step_dtype": str(dtype).removeprefix("torch."), "matmul_GFLOPs": matmul_peak(torch.float32, device)}
    # MFU against the peak of the dtype the steps' matmuls run in (a half-precision peak is far higher)
    r["step_peak_GFLOPs"] = r["matmul_GFLOPs"] if dtype == torch.float32 else matmul_peak(dtype, device)
    real = (out / "teacher.pt").exists() and (out / "dictionary.npz").exists()
    if real:
        tok, rows, dev_rows = load_rows(cfg, out)
    else:  # random tokens
        rows = np.random.default_rng(0).integers(N_SPECIAL, cfg.vocab_size, (4096, cfg.seq_len))
        rows[:, 0], rows[:, -1] = CLS, SEP
        tok, dev_rows = None, rows[:512]
    V = tok.vocab_size if real else cfg.vocab_size
    r["states"] = f"trained teacher of {out}" if real else "untrained teacher, random tokens"
    ids, _, pos = get_batch(rows, cfg, STUDENT_BATCHES, 0, device)

    def step_seconds(name, model, loss_fn, steps=10):
        train_loop(name, model, loss_fn, 2, cfg.lr, cfg, out, device)  # warm-up
        return train_loop(name, model, loss_fn, steps, cfg.lr, cfg, out, device)[1] / steps

    def record(name, model, seconds):  # a step's time, tokens per second and MFU
        r[f"{name}_step_s"], r[f"{name}_tokens_per_s"] = seconds, cfg.batch_size * cfg.seq_len / seconds
        r[f"{name}_MFU"] = step_flops(model, cfg, pos.numel()) / seconds / (r["step_peak_GFLOPs"] * 1e9)

    teacher = build_encoder(cfg, V).to(device)
    record("teacher", teacher, step_seconds("bench_teacher", teacher,
                                            make_mlm_loss(teacher, rows, cfg, TEACHER_BATCHES, device)))
    if real:
        try:
            teacher.load_state_dict(load(out / "teacher.pt")["model"])
        except RuntimeError:  # parameter shapes differ
            raise UserError(f"{out} holds a run of other sizes; pass the options it was made with, or another "
                            f"--out") from None
    targets = bench_dictionary(r, cfg, freeze(teacher), rows, out, real, device)
    student = build_encoder(cfg, V, cfg.n_concepts).to(device)
    mlsm_step_s = step_seconds("bench_student", student, make_mlsm_loss(student, targets, rows, cfg, device))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):  # as inside the step
        r["targets_s"] = wall(lambda: targets(ids, pos), device, 3)
    record("student", student, mlsm_step_s - r["targets_s"])  # the student's own step
    r["targets_over_student_step"] = r["targets_s"] / r["student_step_s"]
    forward_s = wall(lambda: teacher(ids, layer=cfg.teacher_layer, pos=pos), device, 3)  # fp32, as in the targets
    r["coder_share_of_targets"] = 1 - forward_s / r["targets_s"]
    bench_coder(r, cfg, targets, dev_rows, device)
    bench_text(r, cfg, teacher if real else None, tok, device)
    r["peak_memory_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        r["peak_gpu_memory_MB"] = torch.cuda.max_memory_allocated() / 2 ** 20
    save_json(out / "bench.json", r)
    print("\n".join(f"{k:<28}{v:>14.4g}" if isinstance(v, float) else f"{k:<28}{v!s:>14}" for k, v in r.items()))
    return r

def bench_dictionary(r, cfg, teacher, rows, out, real, device):
    """Dictionary learning timed on the teacher's states -> ConceptTargets (the run's own dictionary, if any)."""
    H = teacher_states(teacher, rows, cfg, cfg.dict_tokens, device, cfg.seed)[0]
    (D, mean), r["dictionary_fit_s"] = timed(lambda: learn_dictionary(H, cfg))
    r["dictionary_states"] = len(H)
    if real:
        z = load(out / "dictionary.npz")
        D, mean = torch.from_numpy(z["D"]), torch.from_numpy(z["mean"])
    return ConceptTargets.of_dictionary(teacher, D, mean, cfg, device)

def matmul_peak(dtype, device):
    """GFLOP/s of the best of three square matmuls: this machine's peak in dtype."""
    squares = [torch.randn(n, n, device=device, dtype=dtype) for n in (1024, 2048, 4096)]
    return max(2 * len(a) ** 3 / wall(lambda: a @ a, device, 3) / 1e9 for a in squares)

def bench_text(r, cfg, teacher, tok, device):
    """The tokenizer's speed on --data, and minimal pairs scored per second by a trained teacher."""
    if Path(cfg.data).exists():
        texts = read_corpus(cfg)[0]
        bpe, r["bpe_train_s"] = timed(lambda: Tokenizer.train(texts, cfg.vocab_size))
        r["tokens"], r["bpe_encode_s"] = timed(lambda: sum(len(bpe.encode(t)) for t in texts))
        r["words"] = sum(len(t.split()) for t in texts)
    if cfg.blimp and Path(cfg.blimp).exists() and teacher is not None:
        pairs = {k: v[:20] for k, v in load_pairs(cfg.blimp).items()}
        seconds = wall(lambda: minimal_pairs(mlm_scorer(teacher), tok, pairs, cfg, device), device)
        r["blimp_pairs_per_s"] = sum(len(v) for v in pairs.values()) / seconds

def bench_coder(r, cfg, targets, dev_rows, device):
    """The coder against scikit-learn on 2,000 held-out states, and the share of codes solved within n rounds."""
    from sklearn.decomposition import sparse_encode
    from sklearn.exceptions import ConvergenceWarning

    coder = targets.coder
    H = teacher_states(targets.source, dev_rows, cfg, 2000, device, cfg.seed + 1)[0]
    X = normalise_states(H.to(device), targets.mean)
    r["coder_s"] = wall(lambda: coder.encode(X), device, 3)
    with warnings.catch_warnings():  # scikit-learn's default tolerance: the reference may stop a little short
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref, r["sparse_encode_s"] = timed(lambda: sparse_encode(X.cpu().numpy(), coder.D.cpu().numpy(),
                                                                algorithm="lasso_cd", alpha=cfg.lam, positive=True))
    r["coder_speedup"] = r["sparse_encode_s"] / r["coder_s"]
    A, solved = coder.encode(X)
    gap = coder.objective(X, A).cpu().double() / coder.objective(X, torch.from_numpy(ref).to(device)).cpu().double() - 1
    r.update(coder_unsolved=int((~solved).sum()), coder_gap_mean=float(gap.mean()), coder_gap_max=float(gap.max()))
    r["coder_solved_within_rounds"] = {str(n): round(float(SparseCoder(coder.D, cfg.lam, n).encode(X)[1].float()
                                                           .mean()), 4) for n in (8, 16, 24, 32, 40, 48, 64, 96, 128)}

def main(argv=None):
    try:
        cfg = parse_config(argv)
        if cfg.handout:
            return write_handout(cfg.handout, cfg.exercises)
        if cfg.grade:
            return grade(cfg.grade)
        return bench(cfg) if cfg.bench else run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if shard()[0] == 0:  # once, not once per process
            print("\ninterrupted: finished stages and the last checkpoint are saved; run the same command "
                  "to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            # subtle: a gloo thread may still be freeing the tensors of its last work, which needs the GIL, while
            # the group's destructor joins it holding the GIL (a deadlock before torch 2.8): give it a moment
            time.sleep(0.1)
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
