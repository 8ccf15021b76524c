"""Tests for mlsm.py, in the order of its sections. Offline, CPU only, seeded.

Every hand-written piece is checked against an independent reference: a naive BPE, torch's own
attention and loss functions, scikit-learn's sparse coder. The end-to-end test trains the whole
pipeline on the toy language, whose word classes are known.

The tests named test_exercise<n>_... check the reference body of exercise n against an independent reference;
what a student runs are the checks `--handout` writes into their folder (tested in "The classroom")."""

import ast
import collections
import contextlib
import hashlib
import http.server
import importlib.util
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import sparse_encode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("mlsm", ROOT / "mlsm.py")
mlsm = importlib.util.module_from_spec(_spec)
sys.modules["mlsm"] = mlsm
_spec.loader.exec_module(mlsm)

SAMPLE = ROOT.parent / "shared" / "data" / "babylm_sample"
ALL = slice(None)  # a loss function's `part`: every row of the step
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# The toy language of mlsm.py (--preset toy), whose word classes are known, for the end-to-end tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammar_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("grammar") / "toy"
    mlsm.write_toy_language(d)  # toy.train, toy.dev, pairs/agreement.jsonl
    return d


def tiny_args(data, out, *extra):
    """A tiny run on the CPU, also on a machine with a GPU: only the `-k cuda` tests use one."""
    return ["--preset", "tiny", "--data", str(data), "--out", str(out), "--device", "cpu", *extra]


RUN = ["--dropout", "0.1"]  # the shared run: with dropout, so that resuming must reproduce it too


@pytest.fixture(scope="module")
def tiny_run(grammar_corpus, tmp_path_factory):
    """One uninterrupted tiny pipeline run, shared by the tests that need artifacts."""
    out = tmp_path_factory.mktemp("run")
    results = mlsm.main(tiny_args(grammar_corpus, out, *RUN))
    return out, results


def tiny_cfg(*flags):
    return mlsm.parse_config(["--preset", "tiny", *flags])


def random_rows(n, V=300, T=32):
    """n rows of T random non-special token ids below V (seeded)."""
    return np.random.default_rng(0).integers(mlsm.N_SPECIAL, V, (n, T))


def concept_setup(*flags, device=CPU, rows=100, **coder):
    """The tiny preset with 16 concepts -> cfg, teacher (in eval mode), student, the teacher's targets of a random
    dictionary (seeded, as build_encoder seeds) and mean 0, and `rows` random rows; coder: SparseCoder's options."""
    cfg = tiny_cfg("--n_concepts", "16", *flags)
    teacher, student = (mlsm.build_encoder(cfg, 300, K).to(device) for K in (0, cfg.n_concepts))
    D = F.normalize(torch.randn(cfg.n_concepts, cfg.d_model), dim=-1).to(device)
    coder, mean = mlsm.SparseCoder(D, cfg.lam, **coder), torch.zeros(cfg.d_model, device=device)
    return cfg, teacher, student, mlsm.ConceptTargets(teacher.eval(), coder, mean, cfg.teacher_layer), random_rows(rows)


def run_error(argv, capsys):
    """main(argv) must exit with status 2 and one 'error:' line, no traceback."""
    with pytest.raises(SystemExit) as e:
        mlsm.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    return err


def check(what, returned, expected, **tolerance):
    """torch.testing.assert_close that says what was expected and what came back (exercise tests)."""
    try:
        torch.testing.assert_close(returned, expected, **tolerance)
    except AssertionError as e:
        raise AssertionError(f"{what}\nexpected:\n{expected}\nreturned:\n{returned}\n{e}") from None


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        mlsm.parse_config(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert [f for f in mlsm.Config.__dataclass_fields__ if f"--{f}" not in text] == []
    assert "(default: 5000; cpu: 1700; toy: 1600; tiny: 100)" in text  # --teacher_steps: default and presets
    assert text.count("(default: ") == len(mlsm.Config.__dataclass_fields__)


def test_presets_and_explicit_flags():
    cfg = mlsm.parse_config(["--preset", "cpu", "--lr", "0.01", "--no-center"])
    assert cfg.d_model == mlsm.PRESETS["cpu"]["d_model"] and cfg.lr == 0.01 and cfg.center is False
    assert cfg.out == "runs/cpu"
    assert mlsm.parse_config([]).d_model == mlsm.Config.d_model


@pytest.mark.parametrize("flags, message", [
    (["--mask_rate", "0"], "--mask_rate"), (["--mask_rate", "1.5"], "--mask_rate"),
    (["--n_concepts", "0"], "--n_concepts"), (["--vocab_size", "100"], "--vocab_size"),
    (["--teacher_layer", "3"], "--teacher_layer"), (["--teacher_steps", "-1"], "--teacher_steps"),
    (["--d_model", "30", "--n_heads", "4"], "divisible"), (["--preset", "huge"], "--preset"),
    (["--device", "tpu9"], "--device"), (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--bogus", "1"], "unrecognized arguments"),
])
def test_nonsense_config_is_refused(flags, message, capsys, tmp_path):
    err = run_error(["--preset", "tiny", "--data", str(tmp_path), *flags], capsys)
    assert message in err


def test_config_error_names_only_the_condition_that_failed(capsys, tmp_path):
    err = run_error(["--preset", "tiny", "--data", str(tmp_path), "--n_heads", "5"], capsys)
    assert "--d_model 64 must be divisible by --n_heads 5" in err and "--seq_len" not in err and "--pll" not in err


# ---------------------------------------------------------------------------------------------
# Files and corpus
# ---------------------------------------------------------------------------------------------


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.json"
    mlsm.save_json(path, {"x": 1})

    def broken(f):
        f.write(b"{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mlsm.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"x": 1}


def test_read_text_handles_crlf_blank_lines_and_bad_bytes(tmp_path):
    p = tmp_path / "a.train"
    p.write_bytes(b"first line\r\n\r\n  \nsecond \xff\xfe line\r\nthird")
    assert mlsm.read_text(p) == "first line\nsecond \ufffd\ufffd line\nthird"
    with pytest.raises(mlsm.UserError, match="cannot read"):
        mlsm.read_text(tmp_path)  # a directory: unreadable as a file


def test_find_corpus_layouts(tmp_path):
    for name in ["train/a.train", "train/b.txt", "dev/a.dev", "dev/b.txt", "notes.md"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    train, dev = mlsm.find_corpus(tmp_path)
    assert [p.name for p in train] == ["a.train", "b.txt"]
    assert sorted(p.name for p in dev) == ["a.dev", "b.txt"]
    assert mlsm.find_corpus(tmp_path / "train" / "a.train") == ([tmp_path / "train" / "a.train"], [])


def served_pairs(uid, valid):
    """The body the test server sends for a BLiMP file: one minimal pair, or not JSON at all."""
    return (json.dumps({"sentence_good": "a b", "sentence_bad": "b a", "UID": uid}) if valid else "not json").encode()


class ZipServer(http.server.BaseHTTPRequestHandler):
    """Serves /good (a valid archive), /truncated (cut off mid-way), /missing (404), BLiMP files
    under /blimp/ (valid) and /broken/ (not minimal pairs), and the bodies in `files`."""
    archive = b""
    files = {}

    def do_GET(self):
        if self.path.startswith("/missing"):
            return self.send_error(404)
        if self.path.startswith(("/blimp/", "/broken/")):
            body = served_pairs(self.path.rsplit("/", 1)[1].removesuffix(".jsonl"), self.path.startswith("/blimp/"))
        else:
            body = self.files.get(self.path, self.archive)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if self.path != "/truncated" else body[: len(body) // 2])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("train_10M/childes.train", "hello there\n" * 100)
        z.writestr("train_10M/switchboard.train", "A:\tyes\n" * 100)
    ZipServer.archive = buf.getvalue()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ZipServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hashlib.md5(ZipServer.archive).hexdigest()
    httpd.shutdown()


def test_download_good_archive(server, tmp_path):
    url, md5 = server
    mlsm.download(tmp_path / "babylm", {"train_10M.zip": url + "/good"}, md5, "data", "md5")
    assert sorted(p.name for p in (tmp_path / "babylm").iterdir()) == ["childes.train", "switchboard.train"]
    assert list(tmp_path.iterdir()) == [tmp_path / "babylm"]  # no .part or temporary folder left


@pytest.mark.parametrize("path, md5, message", [
    ("/truncated", None, "could not download|damaged"), ("/good", "0" * 32, "damaged"),
    ("/missing", None, "could not download"),
])
def test_download_failures_leave_nothing_behind(server, tmp_path, path, md5, message):
    url, good_md5 = server
    with pytest.raises(mlsm.UserError, match=message) as e:
        mlsm.download(tmp_path / "babylm", {"train_10M.zip": url + path}, md5 or good_md5, "data", "md5")
    assert "--data" in str(e.value)  # the message says how to do it by hand
    assert list(tmp_path.iterdir()) == []


def listing_sha256(files):
    """What `sha256sum NAME... | sha256sum` prints for these {name: bytes}, in this order."""
    listing = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in files.items())
    return hashlib.sha256(listing.encode()).hexdigest()


def test_download_blimp(server, tmp_path):
    url, _ = server
    blimp_files = lambda base: {f"{p}.jsonl": f"{base}/{p}.jsonl" for p in ("p1", "p2")}
    good = {f"p{i}.jsonl": served_pairs(f"p{i}", True) for i in (1, 2)}
    mlsm.download(tmp_path / "blimp", blimp_files(url + "/blimp"), listing_sha256(good), "blimp")
    assert sorted(mlsm.load_pairs(tmp_path / "blimp")) == ["p1", "p2"]
    broken = {f"p{i}.jsonl": served_pairs(f"p{i}", False) for i in (1, 2)}
    for base, sha, message in (("/broken", listing_sha256(broken), "p1.jsonl:1 is not a minimal pair"),
                               ("/missing", listing_sha256(good), "could not download p1"),
                               ("/blimp", listing_sha256({"p2.jsonl": good["p2.jsonl"], "p1.jsonl": good["p1.jsonl"]}),
                                "damaged or not the pinned ones")):
        with pytest.raises(mlsm.UserError, match=message) as e:
            mlsm.download(tmp_path / "b2", blimp_files(url + base), sha, "blimp")
        assert "--blimp" in str(e.value)
        assert not (tmp_path / "b2").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["blimp"]


def git_blob_id(data):
    """git's blob id of a file's bytes, as a repository's tree records it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_git_blob_ids_are_what_git_hash_object_prints(tmp_path):
    for i, data in enumerate([b"", b"a\n", json.dumps({"label": 1}).encode() * 1000, bytes(range(256)) * 5000]):
        (tmp_path / f"f{i}").write_bytes(data)
        git = subprocess.run(["git", "hash-object", str(tmp_path / f"f{i}")], capture_output=True, text=True).stdout
        assert mlsm.file_digest(tmp_path / f"f{i}", "git") == git.strip() == git_blob_id(data)


@pytest.mark.skipif(not (SAMPLE.parent / "blimp_fast").exists(), reason="../shared/data is not here")
def test_pinned_checksums_match_the_data_here():
    """The pinned sums are those of the BabyLM files in ../shared/data (from the same repository):
    BLiMP's listing, and the blob ids of MRPC and RTE (the other five tasks are not here)."""
    root = SAMPLE.parent
    blimp = {f"{p}.jsonl": (root / "blimp_fast" / f"{p}.jsonl").read_bytes() for p in mlsm.BLIMP_PARADIGMS}
    assert listing_sha256(blimp) == mlsm.BLIMP_SHA256
    here = sorted(p.name for p in (root / "glue").glob("*.jsonl"))
    assert len(here) == 4 and len(mlsm.GLUE_BLOBS) == 14
    assert {n: git_blob_id((root / "glue" / n).read_bytes()) for n in here} == {n: mlsm.GLUE_BLOBS[n] for n in here}


def glue_example(a):
    return (json.dumps({"sentence1": a, "sentence2": "b a", "label": 1}) + "\n").encode()


def test_download_glue(server, tmp_path):
    """Each file checked by its own blob id; a second download adds the files of other tasks to the folder."""
    url, _ = server
    files = {f"{t}.{s}.jsonl": glue_example(t) for t in ("t", "u") for s in ("train", "valid")}
    ZipServer.files = {**{f"/glue/{n}": b for n, b in files.items()},
                       "/bad/t.train.jsonl": files["t.train.jsonl"], "/bad/t.valid.jsonl": b'{"sentence1": "a"}'}
    blobs = {n: git_blob_id(b) for n, b in files.items()}
    names = ["t.train.jsonl", "t.valid.jsonl"]
    mlsm.download(tmp_path / "glue", {n: f"{url}/glue/{n}" for n in names}, blobs, "finetune", "git")
    assert mlsm.load_tasks(tmp_path / "glue") == {"t": ([("t", "b a", 1)], [("t", "b a", 1)])}
    more = ["u.train.jsonl", "u.valid.jsonl"]
    mlsm.download(tmp_path / "glue", {n: f"{url}/glue/{n}" for n in more}, blobs, "finetune", "git")
    assert sorted(mlsm.load_tasks(tmp_path / "glue")) == ["t", "u"] and len(list(tmp_path.iterdir())) == 1
    bad = {**blobs, "t.valid.jsonl": git_blob_id(b'{"sentence1": "a"}')}
    for base, pins, message in (("/glue", {**blobs, "t.valid.jsonl": "0" * 40}, "damaged or not the pinned ones"),
                                ("/missing", blobs, "could not download"),
                                ("/bad", bad, "t.valid.jsonl:1 is not an example of a known task format")):
        with pytest.raises(mlsm.UserError, match=message) as e:
            mlsm.download(tmp_path / "g2", {n: f"{url}{base}/{n}" for n in names}, pins, "finetune", "git")
        assert "--finetune" in str(e.value) and "git blob id" in str(e.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["glue"]  # nothing half-downloaded left


def test_default_tasks_are_fetched_by_task(server, tmp_path, monkeypatch):
    """The default --finetune folder gets the files of the tasks asked for, and later the missing others."""
    url, _ = server
    files = {f"{t}.{s}.jsonl": glue_example(t) for t in ("t", "u", "v") for s in ("train", "valid")}
    ZipServer.files = {f"/glue/{n}": b for n, b in files.items()}
    monkeypatch.setattr(mlsm, "GLUE_URL", f"{url}/glue")
    monkeypatch.setattr(mlsm, "GLUE_BLOBS", {n: git_blob_id(b) for n, b in files.items()})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("some text\n")
    cfg = mlsm.parse_config(["--data", "corpus.txt", "--blimp", "", "--tasks", "t,v"])
    mlsm.fetch_missing(cfg)
    assert sorted(p.name for p in (tmp_path / cfg.finetune).iterdir()) == sorted(n for n in files if n[0] != "u")
    mlsm.fetch_missing(mlsm.parse_config(["--data", "corpus.txt", "--blimp", ""]))  # all tasks
    assert sorted(mlsm.load_tasks(tmp_path / cfg.finetune)) == ["t", "u", "v"]


def test_own_paths_are_checked_before_any_download(tmp_path, capsys, monkeypatch):
    """A typo in --data, offline, with the default BLiMP and tasks still to download: the error names the
    typo at once, in one short line, and nothing is fetched."""
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    err = run_error(["--preset", "cpu", "--data", str(tmp_path / "nonexistent")], capsys)
    assert "--data" in err and "does not exist" in err and len(err) < 200
    err = run_error(["--preset", "tiny", "--data", str(tmp_path), "--finetune", "no/such/tasks"], capsys)
    assert "--finetune no/such/tasks does not exist" in err


def test_by_hand_message_is_short(tmp_path):
    """A failed BLiMP download names the folder, the number of files and the checksum -- not 67 URLs."""
    files = {f"{p}.jsonl": f"http://127.0.0.1:9/blimp/{p}.jsonl" for p in mlsm.BLIMP_PARADIGMS}
    with pytest.raises(mlsm.UserError) as e:
        mlsm.download(tmp_path / "blimp", files, mlsm.BLIMP_SHA256, "blimp")
    message = str(e.value)
    assert "the 67 files" in message and "from http://127.0.0.1:9/blimp/," in message and mlsm.BLIMP_SHA256 in message
    assert len(message) < 600, len(message)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

ROUND_TRIP = ["", "a", "hello world", "  two  spaces\tand tabs\n\nnewlines\r\n", "naïve café Ærø",
              "日本語のテキスト", "emoji 🎉👩‍👩‍👧 and flags 🇭🇺", "under_score __init__ x_1",
              "½ ² ³ ٣ 𝟘", "it's they'll we'VE", "\x00\x01 control \u200b zero-width"]


def random_strings(n, seed):
    rng = random.Random(seed)
    alphabet = "ab _.,'\n\t19½éß日🎉\u0301" + "".join(chr(rng.randrange(32, 0x2FFFF)) for _ in range(50))
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(30))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    text = "\n".join(ROUND_TRIP[1:]) + "\n" + mlsm.toy_text(500, 3)
    return mlsm.Tokenizer.train([text], 600)


def test_pretokens_cover_every_character():
    assert [s for s in ROUND_TRIP + random_strings(300, 0) if "".join(mlsm.PRETOKEN.findall(s)) != s] == []


def test_bpe_round_trip(tok):
    assert [s for s in ROUND_TRIP + random_strings(300, 1) if tok.decode(tok.encode(s)) != s] == []


def test_bpe_textbook_example():
    """Wikipedia's BPE example: aaabdaaabac -> Z=aa: ZabdZabac -> Y=ab: ZYdZYac -> X=ZY: XdXac."""
    tok = mlsm.Tokenizer.train(["aaabdaaabac"], mlsm.N_SPECIAL + 256 + 3)
    a, b, c, d = (mlsm.N_SPECIAL + ord(ch) for ch in "abcd")
    Z, Y, X = range(mlsm.N_SPECIAL + 256, mlsm.N_SPECIAL + 259)
    assert tok.merges == [(a, a), (a, b), (Z, Y)]
    assert tok.encode("aaabdaaabac") == [X, d, X, a, c]


def naive_bpe(text, n_merges):
    """Reference BPE: recount every pair of the whole corpus before each merge."""
    words = [[mlsm.N_SPECIAL + b for b in w.encode("utf-8", "surrogatepass")] for w in mlsm.PRETOKEN.findall(text)]
    merges = []
    for new_id in range(mlsm.N_SPECIAL + 256, mlsm.N_SPECIAL + 256 + n_merges):
        counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < 2:
            break
        merges.append(best)
        words = [mlsm.merge_pair(w, best, new_id) for w in words]
    return merges


def test_incremental_bpe_equals_naive_recount():
    text = mlsm.toy_text(300, 5) + " aaaa bbbb aaaab 🎉🎉 ééé"
    tok = mlsm.Tokenizer.train([text], mlsm.N_SPECIAL + 256 + 150)
    assert tok.merges == naive_bpe(text, 150)
    assert tok.vocab_size == mlsm.N_SPECIAL + 256 + 150


def test_tokenizer_save_load(tok, tmp_path):
    tok.save(tmp_path / "t.json")
    loaded = mlsm.Tokenizer.load(tmp_path / "t.json")
    s = "the happy dogs eat some plums ."
    assert loaded.encode(s) == tok.encode(s) and loaded.vocab_size == tok.vocab_size


# ---------------------------------------------------------------------------------------------
# Packing and masking
# ---------------------------------------------------------------------------------------------


def test_pack_rows():
    rows = mlsm.pack(np.arange(10, 33), 6)  # 23 tokens, 4 per row -> 5 rows, 3 dropped
    assert rows.shape == (5, 6)
    assert (rows[:, 0] == mlsm.CLS).all() and (rows[:, -1] == mlsm.SEP).all()
    assert rows[:, 1:-1].ravel().tolist() == list(range(10, 30))


def test_dev_split_without_dev_files(tmp_path):
    (tmp_path / "a.train").write_text("word " * 1000)
    cfg = tiny_cfg("--dev_fraction", "0.1")
    tok = mlsm.Tokenizer.train(["word " * 10], 300)
    train, dev = mlsm.encode_corpus(cfg, tok, [mlsm.read_text(tmp_path / "a.train")], [])
    assert len(train) == 900 // 30 and len(dev) == 100 // 30


def test_train_words_takes_the_same_share_of_every_file(tmp_path):
    (tmp_path / "a.train").write_text(" ".join(f"a{i:04}" for i in range(3000)))  # words of one length
    (tmp_path / "b.train").write_text("\n".join(f"b{i:03} x" for i in range(500)))  # 1,000 words, in lines
    (tmp_path / "c.dev").write_text("dev words")
    train, dev = mlsm.read_corpus(mlsm.parse_config(["--data", str(tmp_path), "--train_words", "2000"]))
    a, b = (mlsm.read_text(tmp_path / f) for f in ("a.train", "b.train"))
    assert a.startswith(train[0]) and b.startswith(train[1])  # the first part of each file,
    assert abs(len(train[0].split()) - 1500) <= 1 and abs(len(train[1].split()) - 500) <= 1  # half of each
    assert dev == ["dev words"]
    full, _ = mlsm.read_corpus(mlsm.parse_config(["--data", str(tmp_path), "--train_words", "9000"]))
    assert [len(t.split()) for t in full] == [3000, 1000]


def test_counter_lives_on_the_device_of_the_positions():
    """The masked-token counter is summed across processes: NCCL can only sum tensors on the GPU."""
    assert mlsm.count(torch.empty(4, 3, device="meta")).device.type == "meta"
    assert mlsm.count(torch.empty(4, 3, dtype=torch.long)).item() == 12


def test_exercise6_masking_statistics():
    """m = round(0.15 * 40) = 6 distinct positions per row, never [CLS] or [SEP], all replaced by [MASK],
    uniform over the positions, and at() reads them back row by row."""
    B, T = 2000, 42
    ids = torch.randint(mlsm.N_SPECIAL, 1000, (B, T))
    ids[:, 0], ids[:, -1] = mlsm.CLS, mlsm.SEP
    x, pos = mlsm.mask_tokens(ids, 0.15, torch.Generator().manual_seed(0))
    m = round(0.15 * (T - 2))
    assert pos.shape == (B, m) and m == 6, f"expected positions of shape {(B, m)}, returned {tuple(pos.shape)}"
    sel = torch.zeros(B, T, dtype=torch.bool)
    sel[torch.arange(B)[:, None], pos] = True
    assert (sel.sum(1) == m).all()  # m distinct positions in every row
    assert not sel[:, 0].any() and not sel[:, -1].any()  # never [CLS] or [SEP]
    assert (x[sel] == mlsm.MASK).all() and torch.equal(x[~sel], ids[~sel])
    # uniform over positions 1..T-2: each is masked with probability m / (T-2), within 4 sigma
    p = m / (T - 2)
    assert (sel[:, 1:-1].float().mean(0) - p).abs().max() < 4 * (p * (1 - p) / B) ** 0.5
    torch.testing.assert_close(mlsm.at(ids, pos), torch.stack([ids[i, j] for i, row in enumerate(pos) for j in row]))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def test_attention_matches_explicit_softmax_with_padding():
    torch.manual_seed(0)
    B, T, C, H = 3, 7, 16, 4
    attn = mlsm.SelfAttention(C, H, 0.0).eval()
    x = torch.randn(B, T, C)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 5:] = keep[2, 2:] = False
    # reference: softmax(q k^T / sqrt(d) with padded keys at -inf) v, head by head
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in attn.qkv(x).split(C, dim=-1))
    scores = (q @ k.transpose(-1, -2) / (C // H) ** 0.5).masked_fill(~keep[:, None, None, :], float("-inf"))
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x, keep), ref, rtol=1e-5, atol=1e-6)
    # what sits in padded positions cannot change the real ones
    x2 = x.clone()
    x2[~keep] = torch.randn(int((~keep).sum()), C)
    torch.testing.assert_close(attn(x2, keep)[keep], attn(x, keep)[keep])


def test_encoder_layers_and_tied_head():
    torch.manual_seed(0)
    model = mlsm.Encoder(50, 8, 16, 3, 2).eval()
    ids = torch.randint(4, 50, (2, 8))
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(8))
    after1 = model.blocks[0](x)
    torch.testing.assert_close(model(ids, layer=1), after1)
    torch.testing.assert_close(model(ids, layer=-1), model(ids))
    torch.testing.assert_close(model(ids), model.ln_f(model.blocks[2](model.blocks[1](after1))))
    h = torch.randn(5, 16)
    ref = F.linear(model.mlm_transform(h), model.tok_emb.weight, model.mlm_bias)
    torch.testing.assert_close(model.mlm_logits(h), ref)


def test_student_and_baseline_start_from_the_same_weights():
    """Fair comparisons: every parameter the MLSM student shares with the MLM baseline (and the
    teacher) is identical at initialisation; only the concept head is the student's own."""
    cfg = tiny_cfg()
    baseline, student = mlsm.build_encoder(cfg, 300), mlsm.build_encoder(cfg, 300, n_concepts=40)
    b, s = baseline.state_dict(), student.state_dict()
    assert sorted(k for k in s if k not in b) == sorted(f"concept_head.{k}" for k in student.concept_head.state_dict())
    assert [k for k in b if not torch.equal(b[k], s[k])] == []
    assert not torch.equal(b["tok_emb.weight"], mlsm.build_encoder(tiny_cfg("--seed", "1"), 300).tok_emb.weight)


def test_states_at_selected_positions_equal_the_full_forward():
    torch.manual_seed(0)
    model = mlsm.Encoder(50, 12, 16, 3, 2).eval()
    ids = torch.randint(4, 50, (3, 12))
    keep = torch.ones(3, 12, dtype=torch.bool)
    keep[1, 7:] = False
    pos = torch.tensor([[3, 1, 10], [0, 6, 2], [11, 5, 7]])  # (3, 3); row 1 stays inside its real tokens
    for layer in (1, 2, None):
        full = model(ids, keep, layer)  # (3, 12, 16)
        ref = torch.stack([full[b, pos[b, j]] for b in range(3) for j in range(3)])  # (9, 16), row by row
        torch.testing.assert_close(model(ids, keep, layer, pos=pos), ref)


def test_step_flops_counts_the_last_block_at_masked_positions_only():
    cfg = tiny_cfg()  # d 64, 2 layers, T 32, batch 64
    model = mlsm.build_encoder(cfg, 100, n_concepts=8)
    C, T, L, N, M = 64, 32, 2, 64 * 32, 300
    layer = 3 * C * C + C * C + 8 * C * C  # qkv, proj, the MLP's two matrices
    blocks = (L - 1) * layer * N + 3 * C * C * N + (C * C + 8 * C * C) * M
    head = C * C + C * 8
    assert mlsm.step_flops(model, cfg, M) == 3 * (2 * blocks + 4 * T * C * L * N + 2 * head * M)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def test_mlm_loss_on_masked_positions_equals_ignore_index():
    torch.manual_seed(0)
    logits, ids = torch.randn(4, 10, 30), torch.randint(0, 30, (4, 10))
    sel = torch.rand(4, 10) < 0.3
    ref = F.cross_entropy(logits.view(-1, 30), ids.masked_fill(~sel, -100).view(-1), ignore_index=-100)
    torch.testing.assert_close(mlsm.mlm_loss(logits[sel], ids[sel]), ref)


def test_exercise4_code_distribution():
    """p = a / ||a||_1 by hand; an all-zero code has no distribution (a zero row, valid False)."""
    A = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 4.0]])
    p, valid = mlsm.code_distribution(A)
    check("concept distributions of the codes [1 3 0], [0 0 0], [2 2 4]", p,
          torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]]))
    check("which codes have a distribution", valid, torch.tensor([True, False, True]))
    A = torch.relu(torch.randn(50, 12, generator=torch.Generator().manual_seed(0)))
    p, valid = mlsm.code_distribution(A)
    check("random codes: each distribution sums to 1", p[valid].sum(-1), torch.ones(int(valid.sum())))


def test_exercise5_concept_kl_equals_torch_kl_div():
    torch.manual_seed(0)
    logits = torch.randn(6, 12)
    A = torch.relu(torch.randn(6, 12))
    A[2] = 0  # an all-zero code: left out
    A[4, :6] = 0  # exact zeros inside a distribution: 0 log 0 = 0
    p = A / A.sum(-1, keepdim=True).clamp(min=1e-12)  # by hand: exercise 5 does not need exercise 4
    valid = A.sum(-1) > 0
    # the original's loss: KLDivLoss(reduction="batchmean") over every masked row, the all-zero one too
    ref = F.kl_div(F.log_softmax(logits, -1), p, reduction="batchmean")
    check("KL over 6 rows, one of them without a distribution", mlsm.concept_kl(logits, p), ref)
    check("the same 5 rows that have one, scaled to 6", mlsm.concept_kl(logits[valid], p[valid]) * 5 / 6, ref)


# ---------------------------------------------------------------------------------------------
# Concepts: dictionary learning and the sparse coder
# ---------------------------------------------------------------------------------------------


def sklearn_codes(X, D):
    """scikit-learn's non-negative lasso codes of X against D, solved tightly in float64."""
    return torch.from_numpy(sparse_encode(X.double().numpy(), D.double().numpy(), algorithm="lasso_cd", alpha=0.05,
                                          positive=True, max_iter=100000))


def relative_gap(coder, X, A, ref):
    """(objective of codes A - objective of codes ref) / objective of ref, row by row."""
    ours, theirs = coder.objective(X, A), coder.objective(X, ref.to(X))
    return (ours - theirs) / theirs


def anisotropic_problem(N, K, C, seed):
    """Unit-norm states and atoms sharing a common direction, like uncentred teacher states."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(C, generator=g)
    D = F.normalize(torch.randn(K, C, generator=g) + 1.5 * common, dim=-1)
    X = F.normalize(torch.randn(N, C, generator=g) + 1.5 * common, dim=-1)
    return X, D


@pytest.mark.parametrize("K, shrink", [(48, True), (48, False), (300, True)])
def test_sparse_coder_matches_sklearn(K, shrink):
    """shrink=False is what a GPU runs: every row for all rounds, done rows included."""
    X, D = anisotropic_problem(80, K, 24, K)
    coder = mlsm.SparseCoder(D, 0.05, shrink=shrink)
    A, solved = coder.encode(X)
    ref = sklearn_codes(X, D).float()
    assert (A >= 0).all() and (A > 0).sum(1).float().mean() > 4  # a real sparse problem, not all-zero
    assert solved.all() and relative_gap(coder, X, A, ref).max() < 1e-5
    torch.testing.assert_close(A, ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("host_solve", [False, True])
def test_sparse_coder_in_float32_is_exact_on_near_duplicate_atoms(host_solve):
    """No float64 anywhere in the coder (float32 solves with one refinement step; host_solve: the small systems
    solved on the CPU, as on Apple's MPS), on near-duplicate atoms like learned ones (cosine 0.9997 and closer),
    states using both atoms of a pair, against a tight float64 sparse_encode: worst relative gap within 1e-5."""
    X, D = anisotropic_problem(120, 64, 24, 7)
    g = torch.Generator().manual_seed(1)
    twins = F.normalize(D[:16] + 0.003 * torch.randn(16, 24, generator=g), dim=-1)
    D = torch.cat([D, twins])  # (80, 24)
    assert (D[:16] * twins).sum(-1).min() > 0.9997
    w = torch.rand(120, 16, generator=g) * (torch.rand(120, 16, generator=g) < 0.2)  # (N, 16) mixtures
    X = F.normalize(X + 3 * (w @ D[:16] + w.roll(1, 1) @ twins), dim=-1)
    coder = mlsm.SparseCoder(D, 0.05, host_solve=host_solve)
    assert coder.G.dtype == torch.float32
    A, solved = coder.encode(X)
    f = lambda A: 0.5 * ((X.double() - A.double() @ D.double()) ** 2).sum(-1) + 0.05 * A.double().sum(-1)
    ref = f(sklearn_codes(X, D))
    gap = (f(A) - ref) / ref
    assert solved.all() and (A >= 0).all() and (A > 0).sum(1).float().mean() > 4
    assert gap.max() < 1e-5, gap.max()


@pytest.mark.parametrize("limit", [dict(rounds=10), dict(slots=8)])
def test_sparse_coder_flags_rows_it_could_not_finish(limit):
    """Too few rounds, or slots for fewer atoms than a code needs: those rows come back not solved, their codes
    feasible and no better than the optimum (some far from it), and the rows that were solved are optimal."""
    X, D = anisotropic_problem(80, 48, 24, 48)
    coder = mlsm.SparseCoder(D, 0.05)
    best, _ = coder.encode(X)
    A, solved = mlsm.SparseCoder(D, 0.05, **limit).encode(X)
    gap = relative_gap(coder, X, A, best)
    assert (A >= 0).all() and 0 < (~solved).sum() < len(X)
    assert (gap[~solved] > -1e-7).all() and gap[~solved].max() > 1e-3 and (gap[solved].abs() < 1e-6).all()


def test_sparse_coder_solves_codes_of_more_than_32_atoms_by_default():
    """Codes of 34-52 atoms (a teacher trained longer has codes of up to 50): the default coder gives
    every row room for as many atoms as it has rounds, and matches scikit-learn; room for 32 fails."""
    g = torch.Generator().manual_seed(0)
    D = F.normalize(torch.randn(256, 64, generator=g), dim=-1)
    X = F.normalize(torch.randn(40, 64, generator=g), dim=-1)
    coder = mlsm.SparseCoder(D, 0.05)
    A, solved = coder.encode(X)
    ref = sklearn_codes(X, D).float()
    assert (ref > 0).sum(1).min() > 32 and solved.all() and relative_gap(coder, X, A, ref).max() < 1e-5
    assert not mlsm.SparseCoder(D, 0.05, slots=32).encode(X)[1].any()


PER_BACKEND = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9
PRECISIONS = {  # what users write to allow TF32 on a GPU or bf16 on a CPU
    "nothing": lambda: None,
    "allow_tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "high": lambda: torch.set_float32_matmul_precision("high"),
    "medium": lambda: torch.set_float32_matmul_precision("medium"),
    "cuda tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "mkldnn bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
    "every backend tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
}


def precision_settings():
    """Every matmul precision setting, each as read, or the error reading it raises."""
    reads = [lambda: torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision]
    if PER_BACKEND:
        reads += [lambda: torch.backends.cuda.matmul.fp32_precision,
                  lambda: torch.backends.mkldnn.matmul.fp32_precision, lambda: torch.backends.fp32_precision]
    values = []
    for read in reads:
        try:
            values.append(read())
        except RuntimeError as e:  # "mix of the legacy and new APIs"
            values.append(type(e).__name__)
    return values


@pytest.fixture(params=PRECISIONS)
def user_precision(request):
    """Each of PRECISIONS, as a function that sets it (skipped where torch lacks it); the defaults again after."""
    if request.param not in ("nothing", "allow_tf32", "high", "medium") and not PER_BACKEND:
        pytest.skip("torch < 2.9 has no per-backend precision settings")
    yield PRECISIONS[request.param]
    torch.set_float32_matmul_precision("highest")
    if PER_BACKEND:
        torch.backends.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"


def test_coder_computes_in_full_fp32_whatever_the_user_allowed(user_precision):
    """Inside the coder's block every setting reads as full fp32 -- the legacy TF32 flag too, which a GPU's every
    matmul checks against the per-backend one (torch 2.9 refuses a mix) -- the codes are bitwise those under the
    defaults (this CPU's bf16 products moved them by 3e-6 without the block); afterwards every setting is the user's."""
    X, D = anisotropic_problem(400, 1024, 256, 3)
    exact = mlsm.SparseCoder(D, 0.05).encode(X)
    user_precision()
    before = precision_settings()
    with mlsm.full_fp32_matmuls():
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.get_float32_matmul_precision() == "highest"
    codes = mlsm.SparseCoder(D, 0.05).encode(X)
    assert precision_settings() == before
    assert torch.equal(codes[0], exact[0]) and torch.equal(codes[1], exact[1])


def test_targets_in_training_are_those_of_evaluation_under_autocast():
    """Inside a training step's bf16 autocast (here on the CPU, as a GPU runs it) the student's targets
    are exactly the fp32 targets that the dictionary, the dev curve and read_concepts are made from."""
    cfg, teacher, _, targets, rows = concept_setup("--n_concepts", "32")
    ids, _, pos = mlsm.get_batch(rows, cfg, 2, 0, CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_step, counts = targets(ids, pos)
    h = mlsm.at(mlsm.freeze(teacher)(ids), pos)  # (M, C): fp32, all positions, as teacher_states computes them
    A, solved = targets.coder.encode(mlsm.normalise_states(h, targets.mean))
    p, has_mass = mlsm.code_distribution(A)
    torch.testing.assert_close(in_step, p * solved[:, None], atol=1e-6, rtol=0)
    assert counts["zero_codes"] == (~has_mass).sum() and counts["unsolved_codes"] == (~solved).sum()
    assert has_mass.float().mean() > 0.5 and solved.all()


def test_concepts_stage_warns_when_codes_are_left_unsolved(tmp_path, capsys):
    cfg = tiny_cfg("--dict_tokens", "1000", "--n_concepts", "16", "--coder_rounds", "2")
    rows = random_rows(200, cfg.vocab_size)
    teacher = mlsm.freeze(mlsm.build_encoder(cfg, cfg.vocab_size))
    mlsm.learn_concepts(cfg, teacher, rows, rows, tmp_path, CPU)
    assert "not solved within --coder_rounds 2" in capsys.readouterr().err
    cfg.coder_rounds = mlsm.Config.coder_rounds  # learned again, coded with the default rounds: every code solved
    (tmp_path / "dictionary.npz").unlink()
    _, info = mlsm.learn_concepts(cfg, teacher, rows, rows, tmp_path, CPU)
    assert info["unsolved"] == 0 and "warning" not in capsys.readouterr().err


def test_exercise1_states_are_centred_and_unit_norm():
    """x = (h - mean) / ||h - mean||, row by row: a hand-computed case, and random states against numpy."""
    h, mean = torch.tensor([[3.0, 5.0], [2.0, 1.0]]), torch.tensor([0.0, 1.0])
    check("states [3 5], [2 1] less the mean [0 1], at unit norm", mlsm.normalise_states(h, mean),
          torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    H, m = torch.randn(40, 16, generator=g) + 3, torch.randn(16, generator=g)
    ref = (H.numpy() - m.numpy()) / np.linalg.norm(H.numpy() - m.numpy(), axis=1, keepdims=True)
    check("random states", mlsm.normalise_states(H, m), torch.from_numpy(ref))


def test_exercise2_one_state_coder_is_optimal():
    """active_set_one against scikit-learn's sparse_encode, and the KKT conditions of its codes: non-negative,
    the negative gradient w = x D^T - lam - a D D^T zero on the support and at most zero elsewhere."""
    X, D = (t.double() for t in anisotropic_problem(12, 40, 16, 5))
    A = torch.stack([mlsm.active_set_one(x, D, 0.05) for x in X])  # (12, 40)
    ref = sklearn_codes(X, D)
    assert (A >= 0).all() and (A > 0).sum(1).float().mean() > 3, f"expected sparse non-negative codes, returned {A}"
    w = X @ D.T - 0.05 - A @ (D @ D.T)  # (12, 40)
    check("the negative gradient on the support (KKT: zero)", torch.where(A > 0, w, 0), torch.zeros_like(w),
          atol=1e-8, rtol=0)
    assert w[A == 0].max() < 1e-6, f"KKT: expected w <= 0 off the support, returned max {w[A == 0].max():.2e}"
    check("codes against sklearn.decomposition.sparse_encode", A, ref, atol=1e-4, rtol=0)


def test_batched_coder_gives_the_codes_of_the_one_state_reference():
    """SparseCoder is active_set_one made fast: the same codes, row by row, on the CPU's path (rows
    leave when done) and on a GPU's (every row for every round)."""
    X, D = anisotropic_problem(30, 64, 16, 11)
    one = torch.stack([mlsm.active_set_one(x.double(), D.double(), 0.05) for x in X]).float()
    assert (one > 0).sum(1).float().mean() > 4
    for shrink in (True, False):
        A, solved = mlsm.SparseCoder(D, 0.05, shrink=shrink).encode(X)
        assert solved.all()
        torch.testing.assert_close(A, one, atol=1e-5, rtol=0)


def test_exercise3_fista_reaches_the_exact_codes_but_not_in_the_originals_100_steps():
    """The original's coder on a badly conditioned dictionary (pairs of near-parallel atoms, 80 in 32 dimensions):
    with 1,000 steps FISTA reaches the exact coder's objective -- both are right -- while the original's 100 stop
    short (measured: mean gap 1.1e-3, worst 3.0e-3; 1,000 steps 4e-7 at worst); the exact coder is never worse."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 32, generator=g, dtype=torch.float64)
    D = F.normalize(torch.cat([base, base + 0.05 * torch.randn(40, 32, generator=g, dtype=torch.float64)]), dim=-1)
    X = F.normalize(torch.rand(300, 80, generator=g, dtype=torch.float64).pow(8) @ D, dim=-1)  # sparse mixtures
    A, solved = mlsm.SparseCoder(D.float(), 0.05).encode(X.float())
    f = lambda A: 0.5 * ((X - A.double() @ D) ** 2).sum(-1) + 0.05 * A.double().sum(-1)
    gap = lambda iters: (f(mlsm.fista(X, D, 0.05, iters)) - f(A)) / f(A)
    assert solved.all() and (A > 0).sum(1).float().mean() > 8
    long, short = gap(1000), gap(100)
    assert long.abs().max() < 1e-5 and long.min() > -1e-8, f"1,000 steps: expected a gap within 1e-5, returned " \
        f"{long.abs().max():.2e}"
    assert short.mean() > 5e-4 and short.min() > 0, f"100 steps: expected a gap short of the optimum, returned " \
        f"{short.mean():.2e} on average"


def test_fista_coder_gives_every_code_as_a_target_and_says_which_are_optimal():
    """--coder fista: the original's 100 steps behind SparseCoder's interface. On a badly conditioned
    dictionary some codes fail the KKT test, and they stay targets (as in the original), counted; the
    exact coder's codes pass the same test, and a code moved off the optimum fails it."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 32, generator=g)
    D = F.normalize(torch.cat([base, base + 0.05 * torch.randn(40, 32, generator=g)]), dim=-1)
    X = F.normalize(torch.rand(300, 80, generator=g).pow(8) @ D, dim=-1)
    assert not mlsm.FistaCoder(D, 0.05).encode(X)[1].any()  # the original's 100 steps: none within 1e-4 here
    fista = mlsm.FistaCoder(D, 0.05, iters=300)
    A, solved = fista.encode(X)
    torch.testing.assert_close(A, mlsm.fista(X, D, 0.05, 300))
    assert 0 < solved.sum() < len(X) and not fista.exact
    p, counts = mlsm.ConceptTargets(None, fista, torch.zeros(32), -1).of_states(X)
    A, solved = fista.encode(mlsm.normalise_states(X, torch.zeros(32)))  # as of_states codes them
    torch.testing.assert_close(p, mlsm.code_distribution(A)[0])  # unsolved codes are targets all the same
    assert counts["unsolved_codes"] == (~solved).sum() > 0
    exact, ok = mlsm.SparseCoder(D, 0.05).encode(X)
    assert ok.all() and mlsm.kkt_holds(X, exact, D, 0.05, 1e-4).all()
    moved = exact.clone()
    moved[:, 0] += 0.01
    assert not mlsm.kkt_holds(X, moved, D, 0.05, 1e-4).any()


def test_learn_dictionary_recovers_planted_atoms():
    """States that are non-negative mixtures of two of 8 atoms: the learned atoms find them all,
    where random unit vectors in 20 dimensions would reach a cosine of about 0.5."""
    g = torch.Generator().manual_seed(0)
    true = F.normalize(torch.randn(8, 20, generator=g), dim=-1)
    support = torch.rand(3000, 8, generator=g).argsort(1)[:, :2]  # (3000, 2)
    codes = torch.zeros(3000, 8).scatter_(1, support, 0.2 + torch.rand(3000, 2, generator=g))
    X = F.normalize(codes @ true, dim=-1)
    cfg = tiny_cfg("--n_concepts", "8", "--dict_epochs", "5", "--no-center")
    D, mean = mlsm.learn_dictionary(X, cfg)
    assert torch.equal(mean, torch.zeros(20))
    torch.testing.assert_close(D.norm(dim=-1), torch.ones(8))
    assert (true @ D.T).max(1).values.min() > 0.95  # every true atom has a learned twin


# ---------------------------------------------------------------------------------------------
# Training: the frozen-backbone head, resume after interruption
# ---------------------------------------------------------------------------------------------


def test_head_training_leaves_student_bit_identical(tmp_path):
    cfg = tiny_cfg("--head_steps", "20", "--dropout", "0.1")
    student = mlsm.build_encoder(cfg, 300, cfg.n_concepts)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    mlsm.train_head(cfg, student, random_rows(100), 300, tmp_path, CPU)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert not any(p.requires_grad for p in student.parameters()) and not student.training
    assert (tmp_path / "head.pt").exists() and not (tmp_path / "head.ckpt.pt").exists()


def test_head_trains_on_the_fp32_concept_logits_that_evaluation_uses():
    """Under a step's bf16 autocast (here on the CPU, as a GPU runs it) the head's loss is the one on the frozen
    student's fp32 concept logits, as evaluation computes them -- not on bf16 ones."""
    cfg = tiny_cfg("--n_concepts", "16")
    student, head = mlsm.freeze(mlsm.build_encoder(cfg, 300, 16)), torch.nn.Linear(16, 300)
    rows = random_rows(100)
    ids, x, pos = mlsm.get_batch(rows, cfg, mlsm.HEAD_BATCHES, 3, CPU)
    with torch.no_grad():
        z = student.concept_logits(student(x, pos=pos))  # (M, K), fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mlsm.make_head_loss(student, rows, cfg, CPU)(head, 3, ALL)[0]
            assert loss == mlsm.mlm_loss(head(z), mlsm.at(ids, pos))
            assert loss != mlsm.mlm_loss(head(student.concept_logits(student(x, pos=pos))), mlsm.at(ids, pos))


def test_exercise8_head_starts_as_the_unigram_model():
    """W = 0 and b = log add-one-smoothed training frequencies (counted here with numpy): whatever the concept
    logits, the untrained head predicts the unigram distribution."""
    cfg = tiny_cfg("--n_concepts", "16")
    rows = random_rows(100)
    rows[:, 0], rows[:, -1] = mlsm.CLS, mlsm.SEP
    counts = np.bincount(rows[:, 1:-1].ravel(), minlength=300) + 1.0
    head = mlsm.make_head(cfg, rows, 300)
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (300, 16), f"returned {head}"
    check("the head's weights", head.weight, torch.zeros(300, 16))
    check("the head's bias", head.bias, torch.from_numpy(np.log(counts / counts.sum())).float())
    z = torch.randn(8, 16) * 10  # concept logits
    with torch.no_grad():
        check("its log-probabilities", F.log_softmax(head(z), -1), torch.log(torch.from_numpy(counts / counts.sum()))
              .float().expand(8, 300))


class NoHostSync(TorchDispatchMode):
    """Fails on every op after which a GPU would have to stop and report a value to the host:
    .item() / bool() / int() (_local_scalar_dense), nonzero and boolean-mask indexing (their output
    size is data), and linalg's error checks (torch.linalg.solve, unlike solve_ex)."""
    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_linalg_check_errors", "is_nonzero", "equal"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        mask = name.startswith("index") and any(getattr(t, "dtype", None) == torch.bool for t in args[1])
        if name in self.SYNCING or mask:
            raise AssertionError(f"host synchronisation in the step: {func}")
        return func(*args, **(kwargs or {}))


def test_training_steps_never_wait_for_the_device():
    """What a GPU runs in a step -- batch, masks, teacher, coder without shrinking, student, loss,
    backward, clipping -- asks the device for no value; counters stay tensors until a log interval."""
    cfg, teacher, student, targets, rows = concept_setup(shrink=False)
    for model, loss_fn in [(teacher, mlsm.make_mlm_loss(teacher, rows, cfg, 1, CPU)),
                           (student, mlsm.make_mlsm_loss(student, targets, rows, cfg, CPU))]:
        with NoHostSync():
            loss, extras = loss_fn(model, 3, ALL)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        assert loss > 0 and extras["masked"] == cfg.batch_size * round(cfg.mask_rate * (cfg.seq_len - 2))
    with pytest.raises(AssertionError), NoHostSync():  # and the check itself can fail
        torch.ones(3)[torch.ones(3) > 0]


def test_compiled_training_saves_an_uncompiled_state_dict(tmp_path):
    """--compile trains through torch.compile; the checkpoint loads into a plain Encoder."""
    cfg = tiny_cfg("--compile")
    rows = random_rows(100)
    model = mlsm.build_encoder(cfg, 300)
    mlsm.train_or_load("teacher", model, mlsm.make_mlm_loss(model, rows, cfg, 1, CPU), 3, cfg.lr, cfg, tmp_path, CPU)
    saved = torch.load(tmp_path / "teacher.pt")["model"]
    assert saved.keys() == mlsm.build_encoder(cfg, 300).state_dict().keys()
    assert not torch.equal(saved["tok_emb.weight"], mlsm.build_encoder(cfg, 300).tok_emb.weight)  # it trained


def test_joint_loss_adds_weighted_token_cross_entropy():
    """--mlm_weight w: L = L_MLSM + w * L_MLM on the same batch, L_MLM from the student's tied head."""
    cfg, _, student, targets, rows = concept_setup()
    student.eval()
    pure = mlsm.make_mlsm_loss(student, targets, rows, cfg, CPU)(student, 7, ALL)[0]
    cfg.mlm_weight = 0.5
    joint = mlsm.make_mlsm_loss(student, targets, rows, cfg, CPU)(student, 7, ALL)[0]
    ids, x, pos = mlsm.get_batch(rows, cfg, 2, 7, CPU)
    sel = x == mlsm.MASK  # (B, T); the rows hold no [MASK] of their own
    logits = student.mlm_logits(student(x))  # (B, T, V): every position, then ignore the unmasked
    ce = F.cross_entropy(logits.view(-1, 300), ids.masked_fill(~sel, -100).view(-1), ignore_index=-100)
    torch.testing.assert_close(joint, pure + 0.5 * ce)


def test_exercise7_student_loss_is_kl_plus_weighted_token_cross_entropy(monkeypatch):
    """L = KL(p || softmax(concept logits)) + mlm_weight * the token logits' cross-entropy at the masked positions,
    against torch's kl_div and cross_entropy (concept_kl replaced by torch's: exercise 7 does not need exercise 5)."""
    monkeypatch.setattr(mlsm, "concept_kl", lambda z, p: F.kl_div(F.log_softmax(z.float(), -1), p,
                                                                  reduction="batchmean"))
    cfg = tiny_cfg("--n_concepts", "16")
    g = torch.Generator().manual_seed(0)
    student = mlsm.build_encoder(cfg, 300, 16)
    ids = torch.randint(mlsm.N_SPECIAL, 300, (4, cfg.seq_len), generator=g)  # (B, T)
    pos = torch.rand(4, cfg.seq_len - 2, generator=g).argsort(1)[:, :5] + 1  # (B, m)
    h, p = torch.randn(20, cfg.d_model, generator=g), torch.rand(20, 16, generator=g)  # (M, C), (M, K)
    p = p / p.sum(-1, keepdim=True)
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(student.concept_logits(h), -1), p, reduction="batchmean")
        ce = F.cross_entropy(student.mlm_logits(h), torch.stack([ids[b, j] for b in range(4) for j in pos[b]]))
        for weight in (0.0, 0.5):
            cfg.mlm_weight = weight
            check(f"the student's loss with --mlm_weight {weight}", mlsm.student_loss(student, h, p, ids, pos, cfg),
                  kl + weight * ce)


def self_student(steps, every, *extra):
    """A --teacher self student of the tiny preset and its loss function, on random rows."""
    cfg = tiny_cfg("--teacher", "self", "--n_concepts", "16", "--dict_tokens", "1200", "--student_steps", str(steps),
                   "--self_every", str(every), *extra)
    rows = random_rows(200)
    student = mlsm.build_encoder(cfg, 300, 16)
    return cfg, rows, student, mlsm.SelfConcepts(student, rows, cfg, CPU)


def test_self_mode_trains_mlm_first_then_relearns_its_dictionary_at_the_interval(monkeypatch):
    """--teacher self: plain MLM for the first share of steps; a dictionary at every multiple of it, warm-started
    after the first, from the states of every position of the masked rows of the steps just before (enough for
    --dict_tokens: 2 steps of 64 x 32 here), as the original learns it."""
    cfg, rows, student, loss_fn = self_student(40, 0.25, "--dict_tokens", "4000")
    learned, real, now = [], mlsm.learn_dictionary, {}
    monkeypatch.setattr(mlsm, "learn_dictionary",
                        lambda X, cfg, init=None: learned.append((now["step"], len(X), init is None))
                        or real(X, cfg, init))
    for step in range(40):
        now["step"] = step
        loss, extras = loss_fn(student, step, ALL)
        ids, x, pos = mlsm.get_batch(rows, cfg, 2, step, CPU)
        if step < 10:
            mlm = F.cross_entropy(student.mlm_logits(student(x, pos=pos)), mlsm.at(ids, pos))
            torch.testing.assert_close(loss, mlm)
            assert "unsolved_codes" not in extras
        else:
            assert "unsolved_codes" in extras and extras["unsolved_codes"] == 0
        if step % 10 >= 8 and step < 39:  # collected: the states of all B x T positions of its masked rows
            assert len(loss_fn.states) == step % 10 - 7
            with torch.no_grad():
                torch.testing.assert_close(loss_fn.states[-1], student(x).flatten(0, 1), atol=0, rtol=0)
    B_T = cfg.batch_size * cfg.seq_len
    assert learned == [(10, 2 * B_T, True), (20, 2 * B_T, False), (30, 2 * B_T, False)]


def test_self_targets_are_the_codes_of_the_students_own_states_and_carry_no_gradient(monkeypatch):
    """After its first dictionary, a step's targets are the codes of the student's own states at the masked
    positions of its masked rows, read as a teacher's are (fp32, no dropout), as constants: the loss and its
    gradients equal F.kl_div against those codes computed apart; under bf16 autocast the targets are the same."""
    cfg, rows, student, loss_fn = self_student(40, 0.25, "--dropout", "0.1")
    student.train()
    for step in range(10):
        loss_fn(student, step, ALL)
    torch.manual_seed(1)
    loss = loss_fn(student, 10, ALL)[0]  # the first dictionary is learned here, before the forward pass
    assert loss_fn.targets is not None and student.training
    params = list(student.concept_head.parameters()) + [student.tok_emb.weight]
    grads = torch.autograd.grad(loss, params)
    ids, x, pos = mlsm.get_batch(rows, cfg, 2, 10, CPU)
    with torch.no_grad():
        H = student.eval()(x)  # (B, T, C): no dropout
        A, solved = mlsm.SparseCoder(loss_fn.D, cfg.lam).encode(mlsm.normalise_states(mlsm.at(H, pos), loss_fn.mean))
    p = mlsm.code_distribution(A)[0] * solved[:, None]
    torch.manual_seed(1)
    h = student.train()(x, pos=pos)  # (M, C): the training forward, its dropout as in the step
    ref = F.kl_div(F.log_softmax(student.concept_logits(h), -1), p, reduction="batchmean")
    torch.testing.assert_close((loss, *grads), (ref, *torch.autograd.grad(ref, params)))
    assert (A > 0).sum(1).float().mean() > 1
    seen, real = [], loss_fn.targets.of_states
    monkeypatch.setattr(loss_fn.targets, "of_states", lambda h: seen.append(real(h)[0]) or real(h))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(student, 10, ALL)
    assert torch.equal(seen[0], p)


def interrupted_run(argv, monkeypatch, owner, name, when):
    """main(argv) with owner.name raising KeyboardInterrupt at the call for which when(call number, *args) holds;
    the run must end as Ctrl-C ends it (status 130)."""
    real, calls = getattr(owner, name), [0]

    def cut(*args):
        calls[0] += 1
        if when(calls[0], *args):
            raise KeyboardInterrupt
        return real(*args)
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as e:
        patch.setattr(owner, name, cut)
        mlsm.main(argv)
    assert e.value.code == 130


def test_self_mode_resumes_to_the_uninterrupted_result(grammar_corpus, tmp_path, monkeypatch):
    """Interrupted after the checkpoint at step 50, while states for its next dictionary are being
    collected: the resumed run has the same numbers and weights as one never interrupted."""
    args = ["--teacher", "self", "--no-baseline", "--self_every", "0.25"]  # dictionaries at steps 25, 50, 75
    whole = mlsm.main(tiny_args(grammar_corpus, tmp_path / "whole", *args))
    interrupted_run(tiny_args(grammar_corpus, tmp_path / "cut", *args), monkeypatch, mlsm.SelfConcepts, "__call__",
                    lambda n, self, net, step, part: step == 55)
    ck = torch.load(tmp_path / "cut" / "student.ckpt.pt")
    assert ck["step"] == 50 and ck["loss_state"]["D"] is not None and len(ck["loss_state"]["states"]) > 0
    resumed = mlsm.main(tiny_args(grammar_corpus, tmp_path / "cut", *args))
    assert drop_times(resumed) == drop_times(whole) and "teacher (MLM)" not in whole["models"]
    for name in ("student", "head"):
        a, b = (torch.load(tmp_path / d / f"{name}.pt")["model"] for d in ("whole", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def drop_times(results):
    r = json.loads(json.dumps(results))
    r["seconds"] = r["mlsm_needs"] = None
    for p in [p for points in r["curves"].values() for p in points or []]:
        p.pop("seconds")
    for m in r["models"].values():
        m.pop("seconds", None)
    r["dictionary"].pop("seconds")
    r["dictionary"].pop("in_student_seconds", None)
    r["config"]["out"] = None
    return r


def test_resume_after_interruption_gives_identical_results(tiny_run, grammar_corpus, tmp_path, monkeypatch):
    out, results = tiny_run
    interrupted_run(tiny_args(grammar_corpus, tmp_path, *RUN), monkeypatch, mlsm, "concept_kl",
                    lambda n, *_: n == 73)  # in the student stage, after the checkpoint at step 50
    assert (tmp_path / "student.ckpt.pt").exists() and not (tmp_path / "student.pt").exists()
    assert torch.load(tmp_path / "student.ckpt.pt")["step"] == 50
    resumed = mlsm.main(tiny_args(grammar_corpus, tmp_path, *RUN))
    # same seed on the same machine: identical numbers, interrupted or not
    assert drop_times(resumed) == drop_times(results)
    for name in ("teacher", "student", "head", "baseline"):
        a, b = torch.load(out / f"{name}.pt")["model"], torch.load(tmp_path / f"{name}.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_follows_the_gpu(monkeypatch):
    """auto: bf16 where the GPU has it natively, else fp16 (with a gradient scaler); fp32 off CUDA."""
    cuda = torch.device("cuda")  # only the object: nothing is allocated on it
    asked = []
    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native:
                            asked.append(including_emulation) or n)
        assert mlsm.step_dtype("auto", cuda) == (torch.bfloat16 if native else torch.float16)
    assert asked == [False, False]  # emulated bf16 (a T4's) is not taken for native
    assert mlsm.step_dtype("auto", CPU) == mlsm.step_dtype("auto", torch.device("mps")) == torch.float32
    assert mlsm.step_dtype("fp16", CPU) == torch.float16
    assert mlsm.step_dtype("fp32", cuda) == torch.float32


@pytest.mark.parametrize("flags", [["--dtype", "fp16"], ["--micro_batch", "16"]])
def test_interrupted_training_resumes_exactly(flags, tmp_path):
    """--dtype fp16 (run here on the CPU): the gradient scaler is part of the checkpoint; --micro_batch 16: a step's
    rows in four chunks. Interrupted after a checkpoint, the run resumes to the uninterrupted one's weights."""
    cfg = tiny_cfg("--ckpt_every", "10", *flags)

    def train(out, stop=None):
        out.mkdir(exist_ok=True)
        model = mlsm.build_encoder(cfg, 300)
        loss = mlsm.make_mlm_loss(model, random_rows(100), cfg, 1, CPU)

        def loss_fn(net, step, part):
            if step == stop:
                raise KeyboardInterrupt
            return loss(net, step, part)
        return mlsm.train_or_load("teacher", model, loss_fn, 20, cfg.lr, cfg, out, CPU)[0]
    whole = train(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", stop=15)
    ck = torch.load(tmp_path / "cut" / "teacher.ckpt.pt")
    assert ck["step"] == 10 and (ck["scaler"]["scale"] > 1 if cfg.dtype == "fp16" else ck["scaler"] == {})
    resumed = train(tmp_path / "cut")
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert not torch.equal(whole.tok_emb.weight, mlsm.build_encoder(cfg, 300).tok_emb.weight)  # it trained


def test_a_run_resumes_under_another_dtype(grammar_corpus, tmp_path, monkeypatch, capsys):
    """A run begun in bf16 and resumed where --dtype gives fp16 (a notebook that reconnects on another GPU):
    the checkpoint's empty gradient-scaler state is skipped, and the run ends."""
    args = tiny_args(grammar_corpus, tmp_path, "--teacher_steps", "30", "--student_steps", "10", "--head_steps", "10",
                     "--no-baseline", "--ckpt_every", "10")
    interrupted_run(args + ["--dtype", "bf16"], monkeypatch, mlsm, "mlm_loss", lambda n, *_: n == 16)  # step 15
    assert torch.load(tmp_path / "teacher.ckpt.pt")["scaler"] == {}
    capsys.readouterr()
    results = mlsm.main(args + ["--dtype", "fp16"])
    assert "teacher: resuming at step 10" in capsys.readouterr().out and results["models"]["MLSM student + head"]


def test_micro_batches_give_the_step_of_the_whole_batch(tmp_path):
    """--micro_batch 16: a step's 64 rows as four chunks of 16, gradients summed, give the weights of whole-batch
    steps (up to the order of float sums) and the same counters, for the teacher (MLM), student (MLSM) and head."""
    trained = {}
    for micro in ("0", "16"):
        cfg, teacher, student, targets, rows = concept_setup("--micro_batch", micro, rows=200)
        runs = [("teacher", teacher, mlsm.make_mlm_loss(teacher, rows, cfg, 1, CPU)),
                ("student", student, mlsm.make_mlsm_loss(student, targets, rows, cfg, CPU)),
                ("head", torch.nn.Linear(16, 300), mlsm.make_head_loss(student, rows, cfg, CPU))]
        trained[micro] = [(model, mlsm.train_loop(name, model, loss_fn, 4, cfg.lr, cfg, tmp_path / micro, CPU)[0])
                          for name, model, loss_fn in runs]
    for (whole, totals), (chunked, chunked_totals) in zip(trained["0"], trained["16"]):
        assert totals == chunked_totals
        torch.testing.assert_close(whole.state_dict(), chunked.state_dict(), atol=1e-5, rtol=1e-4)
    assert not torch.equal(trained["0"][0][0].tok_emb.weight, mlsm.build_encoder(cfg, 300).tok_emb.weight)


def test_out_of_gpu_memory_names_the_micro_batch_option(grammar_corpus, tmp_path, monkeypatch, capsys):
    def out_of_memory(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(mlsm, "mlm_loss", out_of_memory)
    err = run_error(tiny_args(grammar_corpus, tmp_path), capsys)
    assert "teacher: out of GPU memory in a step of 64 rows" in err and "--micro_batch 16" in err


def test_kill_9_during_training_loses_nothing(grammar_corpus, tmp_path):
    """SIGKILL a real run mid-training; the same command then resumes from the last checkpoint."""
    argv = [sys.executable, mlsm.__file__, *tiny_args(grammar_corpus, tmp_path, "--teacher_steps", "600",
                                                     "--ckpt_every", "10")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # 1 s after its first checkpoint: let it write more checkpoints, so the kill can land during a write
    kill_when_saved(proc, tmp_path / "teacher.ckpt.pt", 120, settle=1.0)
    step = torch.load(tmp_path / "teacher.ckpt.pt")["step"]
    assert 10 <= step < 600
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"teacher: resuming at step {step}" in resumed.stdout
    assert (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# Several processes: torchrun with gloo on the CPU
# ---------------------------------------------------------------------------------------------


def torchrun(args):
    """A run of mlsm.py under torchrun: 2 processes of one thread each."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", mlsm.__file__, *args]
    return subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when_saved(proc, path, timeout, settle=0.0):
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own) once path
    exists (or timeout s have passed) and settle s more, and reap it."""
    try:
        deadline = time.time() + timeout
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(settle)
    finally:
        children = collections.defaultdict(list)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):  # a process that ended meanwhile
                children[int(stat.read_text().rsplit(")", 1)[1].split()[1])].append(int(stat.parent.name))
        todo = [proc.pid]
        while todo:
            p = todo.pop()
            todo += children.get(p, [])
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(p, signal.SIGKILL)
        proc.communicate()


CHUNKS = ["--micro_batch", "16"]


@pytest.fixture(scope="module")
def two_process_run(grammar_corpus, tmp_path_factory):
    """The tiny pipeline on 2 processes, each step's 32 rows a process in chunks of 16 (one gradient all-reduce a
    step), and the same run on one process, in one pass."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    proc = torchrun(tiny_args(grammar_corpus, two, *CHUNKS))
    single = mlsm.main(tiny_args(grammar_corpus, one))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return one, single, two, json.loads((two / "results.json").read_text()), out


def test_two_processes_give_the_numbers_of_one(two_process_run):
    """Same batches, masks and initial weights: the numbers agree up to the order of float sums (gradients summed
    over two half-batches, then averaged). Measured here: dev losses within 7e-6 relative, the dictionary's error
    within 2e-5; the tolerances are 10x that. One code in 2,000 may change its non-zeros, hence 0.01 on the mean."""
    _, single, _, multi, stdout = two_process_run
    assert multi["world_size"] == 2 and single["world_size"] == 1
    assert multi["tokens_seen"] == single["tokens_seen"] and multi["student_zero_codes"] == single["student_zero_codes"]
    scores = lambda m: {k: v for k, v in m.items() if k in ("dev_loss", "dev_acc")}  # the MLSM student has none
    for name, r in single["models"].items():  # pytest.approx of a dict: the same keys, each value close
        assert scores(multi["models"][name]) == pytest.approx(scores(r), rel=1e-4), name
    for name, points in single["curves"].items():
        assert [p["step"] for p in multi["curves"][name]] == [p["step"] for p in points]
        for a, b in zip(multi["curves"][name], points):
            assert a.get("dev_loss", a.get("dev_kl")) == pytest.approx(b.get("dev_loss", b.get("dev_kl")), rel=1e-4)
    assert multi["dictionary"]["rel_error"] == pytest.approx(single["dictionary"]["rel_error"], rel=2e-4)
    assert multi["dictionary"]["nonzeros"] == pytest.approx(single["dictionary"]["nonzeros"], abs=0.01)
    assert stdout.count("data: ") == 1  # one process prints


def test_self_mode_under_torchrun_learns_one_dictionary_for_all(grammar_corpus, tmp_path):
    """--teacher self on 2 processes: each collects the whole batch's states, rank 0 learns the
    dictionary and sends it, and every head takes part in every step's backward pass (DDP)."""
    flags = ["--teacher", "self", "--no-baseline", "--student_steps", "40"]
    proc = torchrun(tiny_args(grammar_corpus, tmp_path / "two", *flags))
    single = mlsm.main(tiny_args(grammar_corpus, tmp_path / "one", *flags))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    multi = json.loads((tmp_path / "two" / "results.json").read_text())
    assert multi["world_size"] == 2 and multi["tokens_seen"] == single["tokens_seen"]
    D = torch.load(tmp_path / "two" / "student.pt")["loss_state"]["D"]
    assert D.shape == (64, 64) and torch.allclose(D.norm(dim=-1), torch.ones(64))
    # not the same atoms: re-learnt dictionaries turn last-bit differences of the states into other
    # dictionaries (measured here: reconstruction error 0.037 against 0.040), as in the teacher mode
    assert multi["models"]["MLSM student + head"]["dev_loss"] == pytest.approx(
        single["models"]["MLSM student + head"]["dev_loss"], rel=1e-3)


def test_checkpoints_of_two_processes_load_in_one(two_process_run):
    """No DistributedDataParallel wrapper ("module." prefixes) in what is saved."""
    _, _, two, _, _ = two_process_run
    cfg = tiny_cfg()
    V = mlsm.Tokenizer.load(two / "tokenizer.json").vocab_size
    for name, K in (("teacher", 0), ("student", cfg.n_concepts), ("baseline", 0)):
        mlsm.build_encoder(cfg, V, K).load_state_dict(torch.load(two / f"{name}.pt")["model"])  # strict


def test_resume_under_torchrun_gives_the_uninterrupted_result(two_process_run, grammar_corpus, tmp_path):
    """kill -9 every process of a 2-process run during the student; the same command resumes from the
    last checkpoint and ends with exactly the numbers of the uninterrupted 2-process run."""
    _, _, _, uninterrupted, _ = two_process_run
    args = tiny_args(grammar_corpus, tmp_path, *CHUNKS)
    kill_when_saved(torchrun(args), tmp_path / "student.ckpt.pt", 300)
    assert (tmp_path / "teacher.pt").exists() and not (tmp_path / "student.pt").exists()
    resumed = torchrun(args)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "student: resuming at step 50" in out
    assert drop_times(json.loads((tmp_path / "results.json").read_text())) == drop_times(uninterrupted)


def test_a_failing_process_stops_the_whole_run(grammar_corpus, tmp_path):
    """A bad option on every process: the run ends with the message, not a hang."""
    proc = torchrun(tiny_args(grammar_corpus, tmp_path, "--batch_size", "63"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "--batch_size 63 must be divisible by the 2 processes" in err


@pytest.mark.parametrize("version, device, needed", [("2.3.1", "cpu", "2.4"), ("2.9.1", "mps", "2.10")])
def test_a_torch_too_old_for_the_device_is_told_what_to_install(version, device, needed, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion(version))
    err = run_error(["--preset", "tiny", "--data", str(tmp_path), "--device", device], capsys)
    assert f"needs torch {needed} or newer, and this is torch {version}: pip install --upgrade 'torch>={needed}'" in err
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.4.0"))
    assert mlsm.pick_device("cpu") == CPU


def test_only_copies_to_cuda_are_non_blocking(monkeypatch):
    """A non-blocking copy returns before it has read its source: from pinned memory on CUDA; on MPS it may read
    a tensor that is freed meanwhile, so there (and on the CPU) copies wait."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: calls.append((str(a[0]), k)) or t)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pinned") or t)
    for device in ("cpu", "mps", "cuda"):
        mlsm.to_device(torch.ones(2), torch.device(device))
    assert calls == [("cpu", {}), ("mps", {}), "pinned", ("cuda", {"non_blocking": True})]


def test_cpu_with_gpu_preset_is_told_the_estimate(capsys):
    mlsm.warn_if_slow(mlsm.parse_config([]), 30_000_000, CPU)
    err = capsys.readouterr().err
    assert "hours" in err and "--preset cpu" in err
    mlsm.warn_if_slow(mlsm.parse_config(["--preset", "cpu"]), 5_000_000, CPU)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Bad input: one clear message, exit status 2
# ---------------------------------------------------------------------------------------------


def test_missing_and_empty_data(tmp_path, capsys):
    assert "does not exist" in run_error(tiny_args(tmp_path / "nope", tmp_path / "o"), capsys)
    assert "no *.train or *.txt" in run_error(tiny_args(tmp_path, tmp_path / "o"), capsys)
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "too small" in run_error(tiny_args(tmp_path, tmp_path / "o2"), capsys)


def test_corpus_too_small_for_dictionary(grammar_corpus, tmp_path, capsys):
    err = run_error(tiny_args(grammar_corpus, tmp_path, "--n_concepts", "5000", "--teacher_steps", "1"), capsys)
    assert "teacher states for 5000 concepts" in err


def test_out_dir_of_another_config_is_refused(tiny_run, grammar_corpus, tmp_path, capsys):
    run = shutil.copytree(tiny_run[0], tmp_path / "run")
    err = run_error(tiny_args(grammar_corpus, run, *RUN, "--lam", "0.1"), capsys)
    assert "different config (lam)" in err
    assert mlsm.main(tiny_args(grammar_corpus, run, *RUN, "--lam", "0.1", "--fresh",
                               "--teacher_steps", "2", "--student_steps", "2", "--head_steps", "2"))


@pytest.mark.parametrize("name", ["tokenizer.json", "train_ids.npy", "dev_ids.npy"])
def test_a_deleted_tokenizer_or_rows_are_made_again(tiny_run, grammar_corpus, tmp_path, name):
    """Stages 1-2 are deterministic: a file of theirs deleted by hand comes back with the same bytes."""
    run = shutil.copytree(tiny_run[0], tmp_path / "run")
    (run / name).unlink()
    assert mlsm.main(tiny_args(grammar_corpus, run, *RUN))
    assert (run / name).read_bytes() == (tiny_run[0] / name).read_bytes()


@pytest.mark.parametrize("name", ["teacher.pt", "dictionary.npz", "train_ids.npy", "tokenizer.json"])
def test_truncated_artifact_gets_clear_message(tiny_run, grammar_corpus, tmp_path, capsys, name):
    path = shutil.copytree(tiny_run[0], tmp_path / "run") / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = run_error(tiny_args(grammar_corpus, path.parent, *RUN), capsys)
    assert name in err and "corrupt or truncated" in err


# ---------------------------------------------------------------------------------------------
# Evaluation: pseudo-log-likelihood on minimal pairs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("word_l2r", [True, False])
def test_batched_pll_equals_brute_force(tok, word_l2r):
    cfg = tiny_cfg("--batch_size", "4")  # small batches: many chunks
    model = mlsm.build_encoder(cfg, tok.vocab_size).eval()
    fn = lambda ids, keep, pos: model.mlm_logits(model(ids, keep)[torch.arange(len(ids)), pos[:, 0]])
    sentences = ["the dog eats .", "a cat", "some very small goats use two old ropes .", "x",
                 "naïve 🎉 words " * 5, "unbelievably quixotic zebras"]
    batched = mlsm.pseudo_log_likelihoods(fn, tok, sentences, cfg, CPU, word_l2r)
    multi_piece = 0
    for s, got in zip(sentences, batched):
        pieces = [tok.encode(text) for text in mlsm.PRETOKEN.findall(s)]
        multi_piece += sum(len(p) > 1 for p in pieces)
        ids = [mlsm.CLS] + [t for p in pieces for t in p]
        word = [-1] + [w for w, p in enumerate(pieces) for _ in p]  # which whitespace-led word each token belongs to
        ids, word = torch.tensor([ids[: cfg.seq_len - 1] + [mlsm.SEP]]), word[: cfg.seq_len - 1] + [-1]
        total = 0.0
        for i in range(1, ids.shape[1] - 1):  # one forward pass per scored token, no padding
            x = ids.clone()  # token i masked, and with word-l2r the later pieces of the same word too
            x[0, [j for j in range(i, ids.shape[1] - 1) if j == i or (word_l2r and word[j] == word[i])]] = mlsm.MASK
            logits = model.mlm_logits(model(x)[0, i])
            logits[: mlsm.N_SPECIAL] = float("-inf")
            total += F.log_softmax(logits, -1)[ids[0, i]].item()
        assert got == pytest.approx(total, abs=1e-4)
    assert multi_piece >= 3  # words split into pieces, where the two scorers differ
    other = mlsm.pseudo_log_likelihoods(fn, tok, sentences, cfg, CPU, not word_l2r)
    assert not np.allclose(batched, other)


def test_tie_counts_as_wrong(tok):
    cfg = tiny_cfg()
    uniform = lambda ids, keep, pos: torch.zeros(pos.numel(), tok.vocab_size)
    pairs = {"p": [("the dog eats .", "the dog eat .")], "q": [("dog", "the dogs eat some cake .")]}
    r = mlsm.minimal_pairs(uniform, tok, pairs, cfg, CPU)
    # under a uniform model PLL = -n log(V - 4): p has equal lengths (a tie), q prefers the shorter
    assert r["ties"] == 1 and r["paradigms"] == {"p": 0.0, "q": 1.0} and r["macro"] == 0.5


def test_malformed_pairs_file(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"sentence_good": "a", "sentence_bad": "b", "UID": "x"}\n'
                                      '{"sentence_good": "c"}\n')
    with pytest.raises(mlsm.UserError, match="a.jsonl:2"):
        mlsm.load_pairs(tmp_path)
    with pytest.raises(mlsm.UserError, match="no \\*.jsonl"):
        mlsm.load_pairs(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# Evaluation: the fine-tuning probe
# ---------------------------------------------------------------------------------------------


def food_tasks(folder, n):
    """The food task -- label 1 when the first sentence mentions a food: separable from the words alone -- with n
    training and n // 3 validation pairs, written into folder and read back."""
    folder.mkdir(exist_ok=True)
    for split, size, seed in (("train", n, 0), ("valid", n // 3, 1)):
        rng, rows = random.Random(seed), []
        for _ in range(size):
            a, b = " ".join(mlsm.toy_sentence(rng)), " ".join(mlsm.toy_sentence(rng))
            label = int(any(mlsm.toy_word_class(w) == "food" for w in a.split()))
            rows.append({"sentence1": a, "sentence2": b, "label": label})
        (folder / f"food.{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return mlsm.load_tasks(folder)


def test_probe_learns_a_separable_task(tiny_run, tmp_path):
    out, results = tiny_run
    tasks = food_tasks(tmp_path, 600)
    cfg = tiny_cfg("--finetune_steps", "150", "--finetune_lr", "1e-3", "--finetune_seeds", "2")
    tok = mlsm.Tokenizer.load(out / "tokenizer.json")
    states = {"baseline": torch.load(out / "baseline.pt")["model"]}
    r = mlsm.probe(states, {}, cfg, tok, tasks, tmp_path, CPU)["baseline"]["finetune"]["food"]
    chance = max(np.mean([y for *_, y in tasks["food"][1]]), 1 - np.mean([y for *_, y in tasks["food"][1]]))
    print(f"probe accuracy {r['acc']['runs']} (majority class {chance:.2f})")
    assert min(r["acc"]["runs"]) > chance + 0.15 and len(r["acc"]["runs"]) == 2 and "f1" in r
    assert len(json.loads((tmp_path / "finetune.json").read_text())) == 2  # an interrupted probe resumes from these


def test_every_babylm_glue_format_is_read(tmp_path):
    """BabyLM's seven (Super)GLUE tasks, one example of each in its own field names."""
    examples = {
        "mrpc": ({"sentence1": "a b", "sentence2": "c d", "label": 1}, ("a b", "c d", 1)),
        "rte": ({"sentence1": "a", "sentence2": "b", "label": 0, "idx": 3}, ("a", "b", 0)),
        "mnli": ({"premise": "p", "hypothesis": "h", "label": 2}, ("p", "h", 2)),
        "qqp": ({"question1": "q1?", "question2": "q2?", "label": 0}, ("q1?", "q2?", 0)),
        "boolq": ({"question": "is it?", "passage": "it is.", "label": 1}, ("is it?", "it is.", 1)),
        "multirc": ({"paragraph": "text", "question": "what?", "answer": "this", "label": 1,
                     "idx": {"paragraph": 1}}, ("what? this", "text", 1)),
        "wsc": ({"text": "Bill saw John because he", "span1_text": "John", "span2_text": "he", "span1_index": 2,
                 "span2_index": 4, "label": 0}, ("Bill saw John because he", "he: John", 0)),
    }
    for task, (item, _) in examples.items():
        for split in ("train", "valid"):
            (tmp_path / f"{task}.{split}.jsonl").write_text(json.dumps(item) + "\n")
    assert mlsm.load_tasks(tmp_path) == {task: ([want], [want]) for task, (_, want) in examples.items()}


def test_three_class_task_fine_tunes_and_reports_macro(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    rng = random.Random(0)
    for split, n in (("train", 90), ("valid", 30)):
        rows = [{"premise": " ".join(mlsm.toy_sentence(rng)), "hypothesis": "x", "label": i % 3} for i in range(n)]
        (tmp_path / f"nli.{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tasks = mlsm.load_tasks(tmp_path)
    cfg = tiny_cfg("--finetune_steps", "3", "--finetune_seeds", "1")
    tok = mlsm.Tokenizer.load(out / "tokenizer.json")
    r = mlsm.probe({"m": torch.load(out / "baseline.pt")["model"]}, {}, cfg, tok, tasks, tmp_path, CPU)["m"]
    assert 0 <= r["finetune"]["nli"]["acc"]["mean"] <= 1 and "f1" not in r["finetune"]["nli"]  # F1: two classes only
    assert r["finetune_macro"] == r["finetune"]["nli"]["acc"]["mean"]


def test_fine_tuning_cache_follows_the_model(tiny_run, tmp_path, monkeypatch):
    """finetune.json is keyed to the model's weights: a retrained model is fine-tuned anew, the same one is not."""
    out, _ = tiny_run
    tasks = food_tasks(tmp_path, 60)
    cfg = tiny_cfg("--finetune_steps", "3", "--finetune_seeds", "1")
    tok = mlsm.Tokenizer.load(out / "tokenizer.json")
    state = torch.load(out / "baseline.pt")["model"]
    calls, real = [], mlsm.finetune
    monkeypatch.setattr(mlsm, "finetune", lambda *a: calls.append(1) or real(*a))
    mlsm.probe({"m": state}, {}, cfg, tok, tasks, tmp_path, CPU)
    mlsm.probe({"m": state}, {}, cfg, tok, tasks, tmp_path, CPU)
    assert len(calls) == 1  # cached
    retrained = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    mlsm.probe({"m": retrained}, {}, cfg, tok, tasks, tmp_path, CPU)
    assert len(calls) == 2 and len(json.loads((tmp_path / "finetune.json").read_text())) == 2


def test_fresh_run_with_another_seed_recomputes_fine_tuning(grammar_corpus, tmp_path):
    food_tasks(tmp_path / "glue", 60)
    args = ["--teacher_steps", "5", "--student_steps", "5", "--head_steps", "5", "--finetune", str(tmp_path / "glue"),
            "--finetune_steps", "3", "--finetune_seeds", "1"]
    mlsm.main(tiny_args(grammar_corpus, tmp_path / "run", *args))
    first = json.loads((tmp_path / "run" / "finetune.json").read_text())
    mlsm.main(tiny_args(grammar_corpus, tmp_path / "run", *args, "--fresh", "--seed", "1"))
    second = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert len(first) == len(second) == 2 and not set(first) & set(second)  # nothing of the old models is kept


def test_malformed_task_files(tmp_path):
    (tmp_path / "t.train.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 1}\n')
    with pytest.raises(mlsm.UserError, match="t.valid.jsonl is missing"):
        mlsm.load_tasks(tmp_path)
    (tmp_path / "t.valid.jsonl").write_text('{"sentence1": "a", "label": "yes"}\n')
    with pytest.raises(mlsm.UserError, match="t.valid.jsonl:1"):
        mlsm.load_tasks(tmp_path)
    (tmp_path / "t.valid.jsonl").write_text('{"premise": "a", "label": 1}\n')  # no hypothesis
    with pytest.raises(mlsm.UserError, match="t.valid.jsonl:1 is not an example of a known task format"):
        mlsm.load_tasks(tmp_path)
    with pytest.raises(mlsm.UserError, match="no <task>.train.jsonl"):
        mlsm.load_tasks(tmp_path / "none")


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_unsolved_targets_are_reported_when_many(tiny_run, capsys):
    """More than 1% of the student's targets without an exact code: said in its progress bar and the report."""
    assert mlsm.unsolved_share({"unsolved_codes": torch.tensor(3), "masked": torch.tensor(100)}) == {"unsolved": "3.0%"}
    assert mlsm.unsolved_share({"unsolved_codes": torch.tensor(1), "masked": torch.tensor(100)}) == {}
    assert mlsm.unsolved_share({"masked": torch.tensor(100)}) == {}  # not a student
    _, results = tiny_run
    mlsm.report(results)
    assert "warning" not in capsys.readouterr().out
    mlsm.report({**results, "student_unsolved_codes": 0.2 * results["tokens_seen"]["MLSM student"]})
    rounds = mlsm.Config.coder_rounds
    warning = f"warning: 20.0% of the student's targets had no exact code within --coder_rounds {rounds}"
    assert warning in capsys.readouterr().out


def test_learning_curves(tiny_run):
    """Evenly spaced dev measurements of every training stage, at the fixed dev masks: the last
    point is the model the table scores, and the teacher's and student's curves fall."""
    _, results = tiny_run
    curves = results["curves"]
    steps = [round(k * 100 / 12) for k in range(13)]
    for name, key in (("teacher", "dev_loss"), ("MLM baseline", "dev_loss"), ("MLSM student", "dev_kl"),
                      ("MLSM student + head", "dev_loss")):
        points = curves[name]
        assert [p["step"] for p in points] == steps, name
        offset = 100 if name == "MLSM student + head" else 0  # after the student's 100 steps
        assert [p["tokens"] for p in points] == [(offset + s) * 64 * 32 for s in steps]
        assert all(a["seconds"] <= b["seconds"] for a, b in zip(points, points[1:])) and all(key in p for p in points)
    m = results["models"]
    assert curves["teacher"][-1]["dev_loss"] == pytest.approx(m["teacher (MLM)"]["dev_loss"], abs=1e-5)
    last = curves["MLSM student + head"][-1]["dev_loss"]
    assert last == pytest.approx(m["MLSM student + head"]["dev_loss"], abs=1e-5)
    assert curves["MLSM student + head"][0]["dev_loss"] == pytest.approx(m["unigram"]["dev_loss"], abs=1e-4)
    assert curves["teacher"][-1]["dev_loss"] < curves["teacher"][0]["dev_loss"] - 1
    assert curves["MLSM student"][-1]["dev_kl"] < curves["MLSM student"][0]["dev_kl"] - 0.5


def test_baseline_sees_the_same_tokens_as_the_student(tiny_run):
    _, results = tiny_run
    seen = results["tokens_seen"]
    assert seen["MLM baseline"] == seen["MLSM student"] > 0
    assert results["config"]["student_steps"] == 100 and "MLM baseline" in results["models"]
    assert seen["MLSM student"] == 100 * 64 * round(0.15 * 30)  # steps x rows x masked per 32-token row


def test_zero_steps_still_report(grammar_corpus, tmp_path):
    """--student_steps 0 (an untrained student and baseline, for comparison) reports, not crashes."""
    r = mlsm.main(tiny_args(grammar_corpus, tmp_path, "--teacher_steps", "10", "--student_steps", "0",
                            "--head_steps", "0"))
    assert r["tokens_seen"] == {"MLSM student": 0, "MLM baseline": 0}
    assert r["models"]["MLSM student + head"]["dev_loss"] == pytest.approx(r["models"]["unigram"]["dev_loss"],
                                                                           abs=1e-4)  # the head starts as unigram


def test_end_to_end_concepts_follow_word_classes(grammar_corpus, tmp_path):
    """--preset toy. An untrained teacher, unfinished codes or an untrained student fail the thresholds,
    which leave room for other CPUs and thread counts (seed 0 with 1-8 threads: AMI codes 0.59-0.64,
    student 0.33-0.42); what breaking each stage does, over seeds, is in README.md (the teacher's key)."""
    # on the fixture's copy of the toy language (the preset's own folder is data/toy)
    results = mlsm.main(["--preset", "toy", "--data", str(grammar_corpus), "--blimp", str(grammar_corpus / "pairs"),
                         "--out", str(tmp_path), "--device", "cpu"])
    teacher_ami, student_ami = results["word_class_ami"]["codes"], results["word_class_ami"]["student"]
    m = results["models"]
    print(f"AMI teacher {teacher_ami:.3f}, student {student_ami:.3f}; dev loss unigram {m['unigram']['dev_loss']:.3f}, "
          f"teacher {m['teacher (MLM)']['dev_loss']:.3f}, MLSM+head {m['MLSM student + head']['dev_loss']:.3f}, "
          f"baseline {m['MLM baseline']['dev_loss']:.3f}; agreement pairs " +
          ", ".join(f"{k} {v['BLiMP']['macro']:.3f}" for k, v in m.items() if "BLiMP" in v))
    assert teacher_ami > 0.32 and student_ami > 0.25
    assert results["dictionary"]["rel_error"] < 0.3
    assert m["teacher (MLM)"]["dev_loss"] < m["unigram"]["dev_loss"] - 0.5
    assert m["MLSM student + head"]["dev_loss"] < m["unigram"]["dev_loss"] - 0.5
    assert json.loads((tmp_path / "results.json").read_text())["models"] == m


def test_bench_smoke(grammar_corpus, tmp_path):
    """--bench measures; here we check that it measured everything, that its figures follow from what it timed --
    MFU against the peak of the dtype the steps ran in (bf16 here, on the CPU), the targets' time taken out of the
    student's step -- and that the coder it timed agrees with scikit-learn (speed targets: bench.json, not asserted)."""
    argv = ["--bench", "--preset", "tiny", "--data", str(grammar_corpus), "--out", str(tmp_path), "--dict_tokens",
            "2000", "--dtype", "bf16", "--device", "cpu"]
    r = mlsm.main(argv)
    assert json.loads((tmp_path / "bench.json").read_text()) == r
    for key in ("matmul_GFLOPs", "teacher_tokens_per_s", "student_tokens_per_s", "targets_over_student_step",
                "coder_speedup", "dictionary_fit_s", "bpe_train_s", "peak_memory_MB", "targets_s"):
        assert r[key] > 0
    assert r["coder_gap_max"] < 1e-4 and not (tmp_path / "bench").exists()
    cfg = mlsm.parse_config(argv)
    tokens, masked = cfg.batch_size * cfg.seq_len, cfg.batch_size * round(cfg.mask_rate * (cfg.seq_len - 2))
    assert r["step_dtype"] == "bfloat16" and r["step_peak_GFLOPs"] != r["matmul_GFLOPs"]
    for name, n_concepts in (("teacher", 0), ("student", cfg.n_concepts)):
        flops = mlsm.step_flops(mlsm.build_encoder(cfg, cfg.vocab_size, n_concepts), cfg, masked)
        assert r[f"{name}_tokens_per_s"] == pytest.approx(tokens / r[f"{name}_step_s"])
        assert r[f"{name}_MFU"] == pytest.approx(flops / r[f"{name}_step_s"] / (r["step_peak_GFLOPs"] * 1e9))
    assert r["targets_over_student_step"] == pytest.approx(r["targets_s"] / r["student_step_s"])


@pytest.mark.skipif(not SAMPLE.exists(), reason="../shared/data/babylm_sample is not here")
def test_real_data_smoke(tmp_path, capsys):
    """The whole pipeline on the real sample, the supplement's pairs and BabyLM's GLUE, in seconds."""
    results = mlsm.main(tiny_args(SAMPLE, tmp_path, "--teacher_steps", "30", "--student_steps", "30",
                                  "--head_steps", "30", "--blimp", str(SAMPLE.parent / "supplement_fast"),
                                  "--finetune", str(SAMPLE.parent / "glue"), "--finetune_steps", "5",
                                  "--finetune_seeds", "2"))
    m = results["models"]
    scored = [name for name, r in m.items() if "dev_loss" in r]
    assert scored == ["unigram", "teacher (MLM)", "MLM baseline", "MLSM student + head"]
    assert [n for n in scored if not (np.isfinite(m[n]["dev_loss"]) and 0 <= m[n]["dev_acc"] <= 1)] == []
    assert [n for n in scored[1:] if not (m[n]["BLiMP"]["pairs"] == 250 and 0 <= m[n]["BLiMP"]["macro"] <= 1)] == []
    for name in ("MLM baseline", "MLSM student"):
        assert sorted(m[name]["finetune"]) == ["mrpc", "rte"]
        assert len(m[name]["finetune"]["mrpc"]["f1"]["runs"]) == 2
    assert 0.5 <= results["majority_class"]["rte"] < 0.6  # 54% of RTE's validation pairs are label 0
    d = results["dictionary"]
    assert 0 < d["rel_error"] < 1 and d["nonzeros"] >= 1
    table = capsys.readouterr().out
    assert "mrpc acc" in table and "rte: majority class 0.540" in table


# ---------------------------------------------------------------------------------------------
# The classroom: the handout folder, its checks, grading
# ---------------------------------------------------------------------------------------------


def student_pytest(folder, *args):
    """python -m pytest in a student's folder -> (exit status, output, {exercise: passed})."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-rA", *args], cwd=folder, capture_output=True, text=True,
                       timeout=900)
    outcomes = {int(n): word == "PASSED" for word, n in re.findall(r"^(PASSED|FAILED) test_exercises.py::test_exercise"
                                                                    r"\[exercise(\d+)\]", r.stdout, re.M)}
    return r.returncode, r.stdout, outcomes


@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    """A student's folder, copied away from the repository: only what --handout wrote."""
    made = tmp_path_factory.mktemp("made") / "handout"
    mlsm.main(["--handout", str(made)])
    return shutil.copytree(made, tmp_path_factory.mktemp("elsewhere") / "student")


def test_handout_holds_what_a_student_needs_and_no_answers(handout):
    assert sorted(p.name for p in handout.iterdir()) == ["EXERCISES.md", "expected.pt", "mlsm.py", "pytest.ini",
                                                          "test_exercises.py"]
    src, sheet = (handout / "mlsm.py").read_text(), (handout / "EXERCISES.md").read_text()
    for n in mlsm.EXERCISES:
        assert f'raise NotImplementedError("exercise {n}: ' in src and f"| {n} |" in sheet
    assert "F.kl_div" not in src + (handout / "test_exercises.py").read_text()
    assert not re.search(r"\d\.\d\d", sheet), "the sheet holds no measured numbers"
    assert "week" in sheet.lower() and "points" in sheet


def test_blank_handout_fails_every_exercise_in_a_few_lines_and_the_reference_passes(handout, tmp_path):
    status, out, outcomes = student_pytest(handout)
    assert status == 1 and outcomes == {n: False for n in mlsm.EXERCISES}
    assert len(re.findall(r"^E .* is not written yet$", out, re.M)) == len(mlsm.EXERCISES)
    assert len(out.splitlines()) < 8 * len(mlsm.EXERCISES)  # a few lines an exercise
    full = shutil.copytree(handout, tmp_path / "full")
    shutil.copy(mlsm.__file__, full / "mlsm.py")  # the reference bodies pasted back
    status, out, outcomes = student_pytest(full)
    assert status == 0 and outcomes == {n: True for n in mlsm.EXERCISES}, out[-3000:]


def test_partial_handout_by_number_and_name(tmp_path):
    mlsm.main(["--handout", str(tmp_path), "--exercises", "2,concept_kl"])
    src = (tmp_path / "mlsm.py").read_text()
    assert re.findall(r'raise NotImplementedError\("exercise (\d+):', src) == ["2", "5"]
    assert student_pytest(tmp_path)[2] == {2: False, 5: False}  # the checks of the exercises handed out
    assert mlsm.exercise_numbers("week2") == {9, 10, 11} and mlsm.exercise_numbers("week1,11") == {*range(1, 9), 11}


def test_unknown_exercise_is_refused_with_the_list(tmp_path, capsys):
    err = run_error(["--handout", str(tmp_path), "--exercises", "12"], capsys)
    assert "--exercises 12" in err and "5 concept_kl" in err


MISTAKES = [  # (exercise, the reference's line, a student's mistake, what the check says)
    (5, "return kl.mean()", "return kl.mean() / logq.shape[-1]", "not over the concepts too"),
    (5, "return kl.mean()", "return kl[target.sum(-1) > 0].mean()", "still counts in M"),
    (5, "kl = (torch.xlogy(target, target) - target * logq).sum(-1)",
     "kl = (target * (target.log() - logq)).sum(-1)", "0 log 0"),
    (6, "pos = torch.rand(B, T - 2, generator=gen, device=ids.device).argsort(1)[:, :m] + 1",
     "pos = torch.rand(B, T - 2, device=ids.device).argsort(1)[:, :m] + 1", "generator=gen"),
    (6, "pos = torch.rand(B, T - 2, generator=gen, device=ids.device).argsort(1)[:, :m] + 1",
     "pos = torch.rand(B, T, generator=gen, device=ids.device).argsort(1)[:, :m]", "[CLS] and [SEP] are never masked"),
    (2, "G, b = D @ D.T, D @ x - lam", "G, b = D @ D.T, D @ x + lam", "the sign of lam"),
    (4, "return A / mass.clamp(min=1e-12), mass.squeeze(-1) > 0", "return A / mass, mass.squeeze(-1) > 0",
     "keep its row zero"),
    (7, "loss = loss + cfg.mlm_weight * mlm_loss", "loss = loss + 0 * mlm_loss", "add mlm_weight times L_MLM"),
    (8, "head.weight.zero_()", "head.weight.mul_(1)", "W = 0"),
    (1, "return F.normalize(h - mean, dim=-1)", "return F.normalize(h, dim=-1)", "subtract the mean"),
    (10, "hide = later & (w == w[np.arange(len(chunk)), at_i][:, None]) if word_l2r else np.arange(T) == at_i[:, None]",
     "hide = np.arange(T) == at_i[:, None]", "later pieces"),
    (11, "logits = self.source.mlm_logits(self.source(ids, pos=pos))",
     "logits = self.source.mlm_logits(self.source(ids.scatter(1, pos, MASK), pos=pos))", "unmasked rows"),
]


@pytest.fixture(scope="module")
def cases():
    return mlsm.exercise_cases(mlsm)


@pytest.mark.parametrize("n, right, wrong, diagnosis", MISTAKES)
def test_checks_diagnose_common_mistakes(n, right, wrong, diagnosis, cases, tmp_path):
    """A student's mistake fails its exercise's check, which says what it probably is -- in a few lines."""
    src = Path(mlsm.__file__).read_text()
    assert src.count(right) == 1
    (tmp_path / "wrong.py").write_text(src.replace(right, wrong))
    spec = importlib.util.spec_from_file_location(f"wrong{n}", tmp_path / "wrong.py")
    wrong_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrong_module)
    with pytest.raises(mlsm.ExerciseFailure) as e:
        mlsm.check_exercise(n, wrong_module, cases)
    assert diagnosis in str(e.value) and len(str(e.value).splitlines()) <= 3, str(e.value)
    mlsm.check_exercise(n, mlsm, cases)  # the reference passes


def test_reference_outputs_agree_with_independent_references(cases):
    """The outputs the checks compare with are right: scikit-learn's codes, torch's KL and softmax."""
    torch.testing.assert_close(cases[2]["out"], sklearn_codes(cases[2]["X"], cases[2]["D"]), atol=1e-5, rtol=0)
    c = cases[5]
    torch.testing.assert_close(c["out"], F.kl_div(F.log_softmax(c["logits"], -1), c["p"], reduction="batchmean"))
    A, solved = cases[9]["out"]
    assert solved.all() and relative_gap(mlsm.SparseCoder(cases[9]["D"], 0.05), cases[9]["X"], A,
                                         sklearn_codes(cases[9]["X"], cases[9]["D"]).float()).abs().max() < 1e-5


def test_grading_prints_one_row_a_student(handout, tmp_path, capsys):
    shutil.copy(mlsm.__file__, tmp_path / "alice.py")
    shutil.copytree(handout, tmp_path / "bob")
    mlsm.main(["--grade", f"{tmp_path}/alice.py,{tmp_path}/bob"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[1:-1] == [str(n) for n in mlsm.EXERCISES]  # exercise order
    total = sum(p for _, _, p, *_ in mlsm.SHEET)
    assert lines[1].split()[1:] == ["pass"] * len(mlsm.EXERCISES) + [f"{total}/{total}"] and "alice" in lines[1]
    assert lines[2].split()[1:] == ["fail"] * len(mlsm.EXERCISES) + [f"0/{total}"] and "bob" in lines[2]


def test_reference_coder_is_active_set_one_for_every_state():
    X, D = anisotropic_problem(30, 24, 16, 2)
    A, solved = mlsm.ReferenceCoder(D, 0.05).encode(X)
    assert solved.all() and torch.equal(A[3], mlsm.active_set_one(X[3], D, 0.05))
    torch.testing.assert_close(A, mlsm.SparseCoder(D, 0.05).encode(X)[0], atol=1e-5, rtol=0)


def test_distillation_control_teaches_the_teachers_token_distribution(grammar_corpus, tmp_path):
    """--targets tokens: at each masked position the student's V-way "concept" head learns softmax of the
    teacher's token logits on the unmasked row; the run goes through the head and the report."""
    cfg = tiny_cfg()
    teacher, rows = mlsm.freeze(mlsm.build_encoder(cfg, 300)), random_rows(100)
    ids, _, pos = mlsm.get_batch(rows, cfg, 2, 0, CPU)
    p, _ = mlsm.TokenTargets(teacher)(ids, pos)
    torch.testing.assert_close(p, F.softmax(teacher.mlm_logits(mlsm.at(teacher(ids), pos)), -1), atol=1e-6, rtol=0)
    r = mlsm.main(tiny_args(grammar_corpus, tmp_path, "--targets", "tokens", "--student_steps", "20",
                            "--head_steps", "5", "--no-baseline"))
    V = mlsm.Tokenizer.load(tmp_path / "tokenizer.json").vocab_size
    assert torch.load(tmp_path / "head.pt")["model"]["weight"].shape == (V, V) and "MLSM student + head" in r["models"]
    assert np.isfinite(r["models"]["MLSM student"]["dev_loss"])  # its "concepts" are tokens: it scores them itself


def test_coder_reference_drives_a_run(grammar_corpus, tmp_path):
    r = mlsm.main(tiny_args(grammar_corpus, tmp_path, "--coder", "reference", "--student_steps", "10",
                            "--head_steps", "5", "--no-baseline", "--dict_tokens", "1000"))
    assert r["student_unsolved_codes"] == 0 and r["config"]["coder"] == "reference"


def test_handout_blanks_only_the_exercise_bodies(handout):
    """Every signature and docstring, and everything outside the exercises, as in mlsm.py."""
    reference, copy = Path(mlsm.__file__).read_text(), (handout / "mlsm.py").read_text()
    defs = [{(n.name, ast.unparse(n.args) if isinstance(n, ast.FunctionDef) else "", ast.get_docstring(n))
             for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            for src in (reference, copy)]
    assert defs[0] == defs[1]
    assert [mlsm.EXERCISE.sub("", src) for src in (reference, copy)] == [mlsm.EXERCISE.sub("", reference)] * 2


# ---------------------------------------------------------------------------------------------
# The toy preset
# ---------------------------------------------------------------------------------------------


def test_toy_preset_makes_its_language_where_it_is_missing(tmp_path, monkeypatch):
    """--preset toy without --data writes the toy language into data/toy (train, dev and minimal pairs) and
    reports how well the concepts follow its word classes; the text is the one the tests use."""
    monkeypatch.chdir(tmp_path)
    r = mlsm.main(["--preset", "toy", "--teacher_steps", "20", "--student_steps", "20", "--head_steps", "5",
                   "--no-baseline", "--device", "cpu"])
    assert (tmp_path / "data/toy/toy.train").read_text() == mlsm.toy_text(20000, 0)
    assert len((tmp_path / "data/toy/pairs/agreement.jsonl").read_text().splitlines()) == 200
    assert set(r["word_class_ami"]) == {"codes", "student"} and "BLiMP" in r["models"]["teacher (MLM)"]


# ---------------------------------------------------------------------------------------------
# README.md
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (ROOT / "README.md").exists(), reason="no README.md beside the tests (a handout)")
def test_readme_map_of_the_file_matches_it():
    """README's map of mlsm.py: each row's lines are one section of the file, from its banner (the docstring: from
    line 1) to the line before the next; every definition it names lies in that section, at the line it gives;
    every other line number it gives is one of the section's sub-banners."""
    lines = (ROOT / "mlsm.py").read_text().split("\n")[:-1]
    starts = [1] + [i + 1 for i, line in enumerate(lines) if line.startswith("# === ")]
    ends = [s - 1 for s in starts[1:]] + [len(lines)]
    defs = {n.name: n.lineno for n in ast.parse("\n".join(lines)).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (\d+)–(\d+) \| (.*)$", readme.split("## A map of `mlsm.py`")[1].split("\n## ")[0], re.M)
    assert [(int(a), int(b)) for a, b, _ in rows] == list(zip(starts, ends))
    for a, b, text in rows:
        for name, line in re.findall(r"`(\w+)(?:\(\))?`(?: \((\d+)\))?", text):
            if name in defs:
                assert int(a) <= defs[name] <= int(b) and (not line or defs[name] == int(line)), (name, line)
        for line in re.findall(r"(?<!`) \((\d+)\)", text):
            assert lines[int(line) - 1].startswith("# --- ") and int(a) <= int(line) <= int(b), line


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU (skipped without one; `-k cuda` selects them)
# ---------------------------------------------------------------------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_models():
    device = torch.device("cuda")
    cfg, teacher, student, targets, rows = concept_setup(device=device)
    mlsm.freeze(teacher)  # the targets' source; an MLM model of its own trains
    mlm = mlsm.build_encoder(cfg, 300).to(device)
    losses = [(mlm, mlsm.make_mlm_loss(mlm, rows, cfg, 1, device)),
              (student, mlsm.make_mlsm_loss(student, targets, rows, cfg, device))]
    return cfg, device, losses


@CUDA
def test_cuda_training_steps_never_synchronise():
    """A teacher and a student step -- batch, masks, teacher, coder, loss, backward, clipping, fused
    AdamW -- under CUDA's sync debug mode, which raises at any host synchronisation."""
    cfg, device, losses = cuda_models()
    dtype = mlsm.step_dtype("auto", device)
    for model, loss_fn in losses:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
        for step in range(2):  # the first step also warms up (lazy initialisation may synchronise)
            torch.cuda.set_sync_debug_mode("error" if step else 0)
            try:
                with torch.autocast("cuda", dtype=dtype):
                    loss, extras = loss_fn(model, step, ALL)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert all(v.device.type == "cuda" for v in extras.values()) and torch.isfinite(loss)


@CUDA
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0),
                    reason="flash attention needs compute capability 8.0")
def test_cuda_attention_runs_flash_where_there_is_no_padding():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    attn = mlsm.SelfAttention(64, 2, 0.0).cuda()
    x = torch.randn(4, 32, 64, device="cuda")
    keep = torch.ones(4, 32, dtype=torch.bool, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        assert attn(x).shape == (4, 32, 64)  # flash only: no mask, so the fused kernel is usable
        with pytest.raises(RuntimeError):
            attn(x, keep)  # a padding mask rules flash out (the memory-efficient kernel takes it)


@CUDA
def test_cuda_nccl_sums_the_step_counters(tmp_path):
    """What train_loop does under torchrun on GPUs: stack a step's counters and all-reduce them with NCCL."""
    import torch.distributed as dist
    _, _, losses = cuda_models()
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for model, loss_fn in losses:
            extras = loss_fn(model, 0, ALL)[1]
            summed = torch.stack(list(extras.values()))
            dist.all_reduce(summed)
            assert summed.tolist() == [int(v) for v in extras.values()]
    finally:
        dist.destroy_process_group()


@CUDA
def test_cuda_coder_matches_sklearn_whatever_the_user_allowed(user_precision):
    """The coder's first matmul on a GPU is where torch 2.9 and newer refuse a mix of the precision settings."""
    X, D = anisotropic_problem(300, 512, 64, 5)
    coder = mlsm.SparseCoder(D.cuda(), 0.05)
    assert not coder.shrink  # a GPU runs every round for every row
    A, solved = coder.encode(X.cuda())
    assert solved.all() and relative_gap(coder, X.cuda(), A, sklearn_codes(X, D).float()).max() < 1e-5
    user_precision()
    allowed = mlsm.SparseCoder(D.cuda(), 0.05).encode(X.cuda())
    assert torch.equal(allowed[0], A) and torch.equal(allowed[1], solved)


@CUDA
def test_cuda_evaluation_and_fine_tuning(tiny_run, grammar_corpus, tmp_path):
    """Dev loss and PLL on the GPU equal the CPU's on the same masks and sentences; fine-tuning learns."""
    out, _ = tiny_run
    cfg = mlsm.parse_config(tiny_args(grammar_corpus, out, *RUN))
    tok, dev_rows = mlsm.Tokenizer.load(out / "tokenizer.json"), np.load(out / "dev_ids.npy")
    cuda = torch.device("cuda")
    teacher = mlsm.freeze(mlsm.build_encoder(cfg, tok.vocab_size))
    teacher.load_state_dict(torch.load(out / "teacher.pt")["model"])
    on_gpu = mlsm.eval_mlm(mlsm.mlm_scorer(teacher.to(cuda)), mlsm.dev_batches(dev_rows, cfg, cuda))["dev_loss"]
    teacher = teacher.to(CPU)
    losses = [F.cross_entropy(teacher.mlm_logits(teacher(x.cpu(), pos=pos.cpu())), mlsm.at(ids, pos).cpu(),
                              reduction="sum") for ids, x, pos in mlsm.dev_batches(dev_rows, cfg, cuda)]
    n = sum(b[2].numel() for b in mlsm.dev_batches(dev_rows, cfg, cuda))
    assert on_gpu == pytest.approx(float(sum(losses)) / n, rel=1e-4)
    sentences = [json.loads(line)["sentence_good"] for line in mlsm.toy_pairs(20, 5).splitlines()]
    pll = {d: mlsm.pseudo_log_likelihoods(mlsm.mlm_scorer(teacher.to(d)), tok, sentences, cfg, d) for d in (CPU, cuda)}
    np.testing.assert_allclose(pll[cuda], pll[CPU], rtol=1e-4)
    tasks = food_tasks(tmp_path, 600)
    cfg = tiny_cfg("--finetune_steps", "150", "--finetune_lr", "1e-3")
    r = mlsm.probe({"baseline": torch.load(out / "baseline.pt")["model"]}, {}, cfg, tok, tasks, tmp_path, cuda)
    labels = [y for *_, y in tasks["food"][1]]
    assert min(r["baseline"]["finetune"]["food"]["acc"]["runs"]) > max(np.mean(labels), 1 - np.mean(labels)) + 0.15
