"""Quantization-aware distillation (bitbasis/distill.py, basis.py; issues 19 and 20): ParetoQ's grids,
resume == uninterrupted, named checkpoint errors, and torchrun (gloo, 2 processes) == one process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitbasis import basis
from bitbasis import distill as D
from bitbasis.convert import ConvertOptions, convert, quantized_from_file

# a tiny model, few short sequences: every run here is seconds
QAT = dict(steps=4, seqs=8, length=16, batch=4, gen_batch=4, train="signs", loss="cakld", swap=0,
           lr=1e-2, sign_lr=0.5, device="cpu")


@pytest.fixture(scope="module")
def start(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "n2.gguf"
    convert(tiny_dir, out, ConvertOptions(method="qbb", bases=2, group=64, extra={"rounds": 1, "iters": 0}),
            progress=False)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITBASIS_CACHE", str(tmp_path / "cache"))   # teacher data written afresh
    return tmp_path / "cache"


def test_paretoq_grids_are_the_papers_levels():
    w = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    wg, valid = basis.groups_view(w, 64)
    amax = wg.abs().amax(-1)
    for n, want in ((2, [-0.75, -0.25, 0.25, 0.75]), (3, [-4, -3, -2, -1, 0, 1, 2, 3])):
        alpha, mu = basis.paretoq_grid(w, n, 64, offset=True)
        levels = (alpha @ basis.level_codes(n).T + mu[..., None]).sort(-1).values
        unit = amax if n == 2 else amax / (2 ** (n - 1) - 1)          # SEQ: α = max|W|; LSQ: d = max|W|/(2^{N-1}-1)
        torch.testing.assert_close(levels, unit[..., None] * torch.tensor(want, dtype=torch.float32))
    alpha, mu = basis.paretoq_grid(w, 1, 64, offset=False)
    torch.testing.assert_close(alpha[..., 0], wg.abs().mean(-1)) and None
    assert mu is None


def test_nearest_level_is_the_signs_sum_in_value_and_gradient():
    """The fused grid projection (one gather of the level's value) trains α and μ exactly as the sum
    Σ α_i s_i + μ of the nearest signs does, for N = 1..3, with and without μ."""
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 3):
        for with_mu in (False, True):
            wg = torch.randn(5, 2, 32, generator=g)
            valid = torch.ones(2, 32)
            alpha0, mu0 = torch.rand(5, 2, n, generator=g) + 0.1, torch.randn(5, 2, generator=g) * 0.1
            out = []
            for fused in (True, False):
                alpha = alpha0.clone().requires_grad_()
                mu = mu0.clone().requires_grad_() if with_mu else None
                if fused:
                    w = basis.nearest_level(wg, alpha, mu, basis.level_codes(n))
                else:
                    w = basis.reconstruct(basis.nearest_signs(wg, alpha.detach(), mu, valid), alpha, mu)
                (w * wg.cos()).sum().backward()               # any loss that weighs the weights unevenly
                out.append((w.detach(), alpha.grad, mu.grad if with_mu else None))
            torch.testing.assert_close(out[0][0], out[1][0])
            torch.testing.assert_close(out[0][1], out[1][1])
            if with_mu:
                torch.testing.assert_close(out[0][2], out[1][2])
            # and the value is the nearest level: no level of the group is closer
            levels = alpha0 @ basis.level_codes(n).T + (mu0[..., None] if with_mu else 0)
            best = (wg[..., None] - levels[:, :, None, :]).abs().amin(-1)
            torch.testing.assert_close((out[0][0] - wg).abs(), best)


def test_chunked_loss_equals_autograd_through_log_softmax(monkeypatch):
    """loss_fn's closed-form gradients (distill._LogitLoss), over several chunks, equal autograd on the
    plain formulas, for every loss."""
    monkeypatch.setattr(D, "LOSS_CHUNK", 3 * 50)                # 3 positions per chunk: 4 chunks of 10
    g = torch.Generator().manual_seed(2)
    zt, zs0 = torch.randn(2, 5, 50, generator=g) * 3, torch.randn(2, 5, 50, generator=g) * 3
    lt = torch.log_softmax(zt, -1)

    def kl(p, q):                                                 # KL(p ‖ q) per position, from log-probs
        return (p.exp() * (p - q)).sum(-1).mean()
    for loss, gamma in (("kl", 0.0), ("kl+mse", 0.0), ("cakld", 0.3)):
        cfg = D.DistillConfig(loss=loss, mse_weight=0.7)
        zs = zs0.clone().requires_grad_()
        got, got_kl = D.loss_fn(cfg, zt, zs, gamma)
        got.backward()
        zr = zs0.clone().requires_grad_()
        ls = torch.log_softmax(zr, -1)
        want = {"kl": kl(lt, ls), "kl+mse": kl(lt, ls) + 0.7 * ((zr - zt) ** 2).mean(),
                "cakld": gamma * kl(ls, lt) + (1 - gamma) * kl(lt, ls)}[loss]
        want.backward()
        torch.testing.assert_close(got, want.detach())
        torch.testing.assert_close(got_kl, kl(lt, ls).detach())
        torch.testing.assert_close(zs.grad, zr.grad)


def test_the_weight_bank_equals_each_linear_alone(tiny_dir, start):
    """distill._WeightBank (all latents' weights in one expression per step) gives every linear the
    weight, and every trainable tensor the gradient, of BasisLinear.weight alone; with offsets too."""
    quantized, _ = quantized_from_file(start, tiny_dir)
    g = torch.Generator().manual_seed(3)
    for grid in (None, "paretoq"):
        mods = []
        for bb in quantized.values():
            gr = None
            if grid:                                          # a grid with μ: the offset path
                w = basis.reconstruct(*basis.unpack(bb)).reshape(bb.shape[0], -1)[:, :bb.shape[1]]
                gr = basis.paretoq_grid(w, bb.n_planes, bb.group, offset=True)
            m = D.BasisLinear(bb, train_signs=True, grid=gr)
            with torch.no_grad():                             # move off the start so rounding is not trivial
                m.u.add_(0.3 * torch.randn(m.u.shape, generator=g))
                m.a.add_(0.1 * torch.randn(m.a.shape, generator=g))
            mods.append(m)
        probes = [torch.randn(m.cols, generator=g) for m in mods]
        grads = []
        for banked in (True, False):
            for m in mods:
                for p in m.parameters():
                    p.grad = None
            bank = D._WeightBank(mods) if banked else None
            if bank:
                bank.assign()
            ws = [m(torch.eye(m.cols)).T for m in mods]             # forward: the weight itself
            sum(((w @ p) ** 2).sum() for w, p in zip(ws, probes)).backward()
            if bank:
                bank.clear()
                assert all("banked" not in m.__dict__ for m in mods)
            grads.append(([w.detach() for w in ws], [p.grad.clone() for m in mods for p in m.parameters()]))
        for x, y in zip(grads[0][0] + grads[0][1], grads[1][0] + grads[1][1]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_all_calibration_text_needs_no_teacher(tiny_dir, cache, monkeypatch):
    """--calib-frac 1: every sequence is a calibration window (the teacher writes none), int32 ids."""
    from bitbasis import data
    monkeypatch.setattr(data, "read_text", lambda spec: "To be, or not to be, that is the question. " * 40)
    cfg = D.DistillConfig(seqs=6, length=16, calib_frac=1.0)
    data = D.teacher_data(None, tiny_dir, cfg, torch.device("cpu"), False, D.Dist())
    assert data.shape == (6, 16) and data.dtype == torch.int32
    torch.testing.assert_close(data, D.calib_windows(tiny_dir, 6, 16, cfg.seed))


def _same(a: dict, b: dict, atol=1e-6):
    for k in a:
        np.testing.assert_array_equal(a[k].signs, b[k].signs, err_msg=k)
        np.testing.assert_allclose(a[k].scales, b[k].scales, rtol=1e-5, atol=atol, err_msg=k)
        if a[k].offsets is not None:
            np.testing.assert_allclose(a[k].offsets, b[k].offsets, rtol=1e-5, atol=atol, err_msg=k)


def test_resumed_qat_equals_uninterrupted_and_bad_checkpoints_are_named(tiny_dir, start, tmp_path, cache):
    q, _ = quantized_from_file(start, tiny_dir)
    full = D.distill(tiny_dir, q, D.DistillConfig(**QAT, ckpt=str(tmp_path / "full.pt")), progress=False)
    assert any(not np.array_equal(full[k].signs, q[k].signs) for k in q)          # signs trained
    hist = torch.load(tmp_path / "full.pt", weights_only=False)["history"]
    assert len(hist) == QAT["steps"] and np.isfinite(hist).all()

    cut = D.DistillConfig(**QAT, ckpt=str(tmp_path / "cut.pt"), stop_at=2)
    assert D.distill(tiny_dir, q, cut, progress=False) is None                   # stopped at a checkpoint
    assert torch.load(tmp_path / "cut.pt", weights_only=False)["step"] == 2
    resumed = D.distill(tiny_dir, q, D.DistillConfig(**QAT, ckpt=str(tmp_path / "cut.pt")), progress=False)
    _same(resumed, full)

    other = D.DistillConfig(**dict(QAT, lr=2e-2), ckpt=str(tmp_path / "full.pt"))
    with pytest.raises(D.CheckpointError, match="other settings"):
        D.distill(tiny_dir, q, other, progress=False)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(D.CheckpointError, match="unreadable"):
        D.distill(tiny_dir, q, D.DistillConfig(**QAT, ckpt=str(bad)), progress=False)


def test_bad_settings_are_refused_in_one_line(start, tmp_path):
    for opt, msg in ((["--loss", "mse"], "invalid choice"), (["--swap", "2"], "swap and calib_frac"),
                     (["--batch", "0"], "batch >= 1")):
        r = subprocess.run([sys.executable, "-m", "bitbasis", "distill", str(start), "-o", str(tmp_path / "x.gguf"),
                            "--model", "/nonexistent-not-read", "-q", *opt], capture_output=True, text=True)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def single(tiny_dir, start, tmp_path_factory):
    """The single-process run every multi-process run below must equal."""
    from bitbasis.cli.distill import distill_file
    d = tmp_path_factory.mktemp("single")
    distill_file(start, d / "single.gguf", tiny_dir, D.DistillConfig(**QAT, ckpt=str(d / "one.pt")), progress=False)
    return d / "single.gguf"


def _torchrun(args: list[str], env: dict) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2",
                           "-m", "bitbasis", "distill", *args], capture_output=True, text=True, env=env, timeout=600)


def _multi_args(start, tiny_dir, tmp_path, tag):
    """The command-line twin of QAT, and the environment for torchrun's processes."""
    env = dict(os.environ, BITBASIS_CACHE=str(tmp_path / "cache2"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(D.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / f"{tag}.gguf"
    args = [str(start), "-o", str(out), "--model", str(tiny_dir), "-q", "--ckpt", str(tmp_path / f"{tag}.pt"),
            "--steps", "4", "--seqs", "8", "--length", "16", "--batch", "4", "--gen-batch", "4", "--train", "signs",
            "--loss", "cakld", "--swap", "0", "--lr", "0.01", "--sign-lr", "0.5", "--device", "cpu"]
    return args, env, out


def test_torchrun_ddp_then_fsdp_equal_one_process(tiny_dir, start, single, tmp_path, cache):
    """Issue 20: the same command under torchrun (gloo, 2 ranks x 2 sequences) equals the single process
    on the same global batch (4). Data parallel to step 2 (checkpoint), then resumed with --fsdp (FSDP2:
    half of every parameter per rank; latents clipped at the last step through gathered, written-back
    shards; the file gathered for rank 0): the file equals the single run's, and so does the sharded
    run's final checkpoint (gathered into the single-process layout) — one checkpoint format for all."""
    args, env, out = _multi_args(start, tiny_dir, tmp_path, "multi")
    r = _torchrun(args + ["--stop-at", "2"], env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "distributed: world size 2, backend gloo, 2 sequences per rank per step" in r.stderr
    assert "stopped at step 2 of 4" in r.stderr and not out.exists()
    r = _torchrun(args + ["--fsdp"], env)                                       # resumes from step 2, sharded
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("distributed: world size 2, backend gloo, FSDP (fully_shard per block; rank 0 holds 50.0% of the "
            "parameters), 2 sequences per rank per step") in r.stderr
    a, b = quantized_from_file(single, tiny_dir)[0], quantized_from_file(out, tiny_dir)[0]
    _same(a, b, atol=1e-5)
    want = torch.load(single.with_name("one.pt"), weights_only=False)
    got = torch.load(tmp_path / "multi.pt", weights_only=False)
    assert got["step"] == want["step"] == 4 and got["student"].keys() == want["student"].keys()
    for k, v in want["student"].items():
        torch.testing.assert_close(got["student"][k], v, rtol=1e-4, atol=1e-4, msg=k)   # latents ~3, steps ~0.5
    for i, st in want["opt"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["opt"]["state"][i][k], st[k], rtol=1e-4, atol=1e-7, msg=f"{i} {k}")


def test_fsdp_needs_torchrun_and_swap_0(start, tmp_path):
    for opt, msg in ((["--swap", "0"], "start it with torchrun"), (["--swap", "0.5"], "needs --swap 0")):
        r = subprocess.run([sys.executable, "-m", "bitbasis", "distill", str(start), "-o", str(tmp_path / "x.gguf"),
                            "--fsdp", "--device", "cpu", "-q", *opt], capture_output=True, text=True,
                           env=dict(os.environ, WORLD_SIZE="1"))
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]


def test_a_rotated_file_distils_against_the_rotated_teacher(tiny_dir, start, tmp_path, cache):
    """convert's default rotation is folded into the file's weights: its teacher is the same rotation of
    the model (the file's linears approximate it far better than the unrotated weights), never the
    unrotated model, which trained such a file towards the wrong function before."""
    from bitbasis import format as bbf, hf
    from bitbasis.cli.distill import teacher_dir
    assert teacher_dir(start, tiny_dir) == tiny_dir                                # not rotated
    rot = tmp_path / "rot.gguf"
    convert(tiny_dir, rot, ConvertOptions(method="qbb", bases=2, group=64, rotate=True,
                                          extra={"rounds": 1, "iters": 0}), progress=False)
    t = teacher_dir(rot, tiny_dir)
    assert t != tiny_dir and "bitbasis_rotation" in hf.load_config(t)
    q, _ = quantized_from_file(rot, t)
    sd_rot, sd = hf.load_state_dict(t), hf.load_state_dict(tiny_dir)
    for k, bb in q.items():
        w = bbf.dequantize(bb)
        assert np.linalg.norm(w - sd_rot[k]) < 0.8 * np.linalg.norm(w - sd[k]), k


def test_embedding_and_head_train_as_bases_and_are_written_so(tiny_dir, start, tmp_path, cache):
    """--embed-bases / --head-bases (issue 19 item 4): the token embedding / head become N:G binary bases
    trained with the linears and written packed. The tiny model is tied: one tensor (token_embd, no
    output.weight); a rotated file's head is its own tensor, quantized alone when only --head-bases."""
    from bitbasis import format as bbf, hf
    from bitbasis.cli.distill import distill_file
    from bitbasis.gguf_io import read_model
    out = tmp_path / "e.gguf"
    distill_file(start, out, tiny_dir, D.DistillConfig(**QAT, embed_bases="4:64", head_bases="4:64",
                                                       ckpt=str(tmp_path / "e.pt")), progress=False)
    mf = read_model(out)
    assert "token_embd.weight" in mf.packed and "output.weight" not in mf.packed and "output.weight" not in mf.dense
    emb = bbf.unpack(mf.packed["token_embd.weight"], "token_embd.weight")
    assert (emb.n_planes, emb.group) == (4, 64)
    w = hf.load_state_dict(tiny_dir)["model.embed_tokens.weight"]
    start_bb = D.outer_bases(hf.load_torch_model(tiny_dir), {}, D.DistillConfig(embed_bases="4:64"), tied=True)
    w0 = bbf.dequantize(start_bb[D.EMBED])
    err = np.linalg.norm(bbf.dequantize(emb) - w) / np.linalg.norm(w)
    assert err < 0.5 and not np.allclose(bbf.dequantize(emb), w0)    # trained (the test's large steps), still near
    assert np.linalg.norm(w0 - w) / np.linalg.norm(w) < 0.15     # the 16-level start itself: ~0.11

    with pytest.raises(D.DistillError, match="ties its head"):
        D.distill(tiny_dir, quantized_from_file(start, tiny_dir)[0],
                  D.DistillConfig(**QAT, embed_bases="4:64", head_bases="2:64"), progress=False)
    with pytest.raises(D.DistillError, match="N:G"):
        D.DistillConfig(embed_bases="4").check()

    rot = tmp_path / "rot.gguf"
    convert(tiny_dir, rot, ConvertOptions(method="qbb", bases=2, group=64, rotate=True,
                                          extra={"rounds": 1, "iters": 0}), progress=False)
    out2 = tmp_path / "h.gguf"
    distill_file(rot, out2, tiny_dir, D.DistillConfig(**QAT, head_bases="4:64", ckpt=str(tmp_path / "h.pt")),
                 progress=False)
    mf2 = read_model(out2)
    assert "output.weight" in mf2.packed and "token_embd.weight" in mf2.dense
