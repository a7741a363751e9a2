"""Train (or continue training) the demo hypernetwork and write demo/weights/demo_hypernet.safetensors.

    python demo/train_hypernet.py --resume                          # continue the shipped file (CPU)
    python demo/train_hypernet.py --resume --device cuda --seconds 400     # as many steps as fit 400 s on a GPU
    python demo/train_hypernet.py --steps 20 --out /tmp/h.safetensors      # a quick run from scratch
    python demo/train_hypernet.py --resume --fits /tmp/fits.safetensors --fit-subjects 24 --regress-steps 600 \
        --steps 0 --out /tmp/h.safetensors      # experimental weight-space pretraining on directly fitted LoRAs
    python demo/train_hypernet.py --resume --basis 32 --fits /tmp/protos.safetensors --fit-parallel 8 --steps 0 \
        --out /tmp/b.safetensors                # basis decoder from 32 directly fitted prototype subjects

Runs GL_HypernetworkTrain's code (`guiders/hypernet_train.train_hypernet`) in the real host (tests/host.py boots
ComfyUI; `--device cuda` lets it use the GPU) on the demo model and the demo world's training subjects (coarse
surface patterns on demo shapes, `demo/subjects.py`); held-out subjects are never drawn. Without --resume the
network is built with the shipped file's architecture (rank 4, width 128, depth 2, attention + feed-forward +
convolutions) after `--pretrain` steps of contrastive encoder pretraining. With `--seconds`, two short timed runs
first measure the seconds per step and the main run gets as many steps as fit. The file's metadata holds the
settings, the probe-loss history, the seconds and the command; earlier rounds of a resumed file are kept under
`rounds`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from _script import REPO, log, recorded_args  # demo/ is first on sys.path when this runs as a script

DEFAULT_OUT = REPO / "demo" / "weights" / "demo_hypernet.safetensors"
LAYERS = "attention + feed-forward + convolutions (UNet)"
CALIBRATION_STEPS = (10, 40)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="safetensors file to write")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (half the file; loading widens them to float32)")
    p.add_argument("--resume", nargs="?", const=str(DEFAULT_OUT), default=None,
                   help="continue this hypernetwork file (no value: the shipped one)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on the CPU")
    p.add_argument("--steps", type=int, default=1200, help="training steps (ignored with --seconds)")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="time budget of the main run: the step count is measured to fit it (0 = use --steps)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--subjects", type=int, default=2000, help="training subjects drawn from")
    p.add_argument("--subjects-per-step", type=int, default=4)
    p.add_argument("--ref-images", type=int, default=3)
    p.add_argument("--target-images", type=int, default=4)
    p.add_argument("--output-reg", type=float, default=1e-4)
    p.add_argument("--pretrain", type=int, default=800, help="encoder pretraining steps (new networks only)")
    p.add_argument("--train-encoder", action="store_true",
                   help="train the encoder end to end too (default: frozen after pretraining)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-contrast", type=float, default=0.0,
                   help="λ of the reference-contrast term (experimental; 0 = off, as the shipped file was trained)")
    p.add_argument("--contrast-margin", type=float, default=0.1,
                   help="how much higher (share) the loss with another subject's references must be")
    p.add_argument("--x0-loss", action="store_true",
                   help="weigh the x0 error alike at every noise level (experimental; default: the native "
                        "Min-SNR-capped loss the shipped file was trained with)")
    p.add_argument("--subject-query", action="store_true",
                   help="add the pooled subject embedding to every query of the decoder (experimental; added "
                        "zero-initialised when resuming a network without it)")
    w = p.add_argument_group("weight-space pretraining (experimental; HyperDreamBooth precedent)")
    w.add_argument("--fits", default=None,
                   help="safetensors collection of directly fitted subject LoRAs (created or continued here); with "
                        "--regress-steps, the network is first regressed onto them, then trained end to end for "
                        "--steps (0: not at all)")
    w.add_argument("--fit-subjects", type=int, default=0, help="training subjects 0..N-1 to fit (missing ones)")
    w.add_argument("--fit-steps", type=int, default=300)
    w.add_argument("--fit-lr", type=float, default=5e-3)
    w.add_argument("--fit-images", type=int, default=64)
    w.add_argument("--regress-steps", type=int, default=0)
    w.add_argument("--regress-lr", type=float, default=1e-3)
    w.add_argument("--held-out", type=float, default=0.2,
                   help="share of the fitted subjects kept out of the regression")
    w.add_argument("--fit-parallel", type=int, default=1, help="subjects fitted together in one batched forward")
    b = p.add_argument_group("basis decoder from prototype fits (experimental)")
    b.add_argument("--basis", type=int, default=0,
                   help="K > 0: choose K prototype training subjects (k-means on the resumed network's subject "
                        "embeddings), fit each directly into --fits, and build a basis-decoder network from them; "
                        "then train it end to end for --steps (0: not at all)")
    b.add_argument("--basis-pool", type=int, default=1000, help="training subjects the prototypes are chosen from")
    b.add_argument("--basis-temperature", type=float, default=0.02,
                   help="temperature of the initial mixing weights (softmax over cosine similarity)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    os.environ["GL_TEST_DEVICE"] = args.device
    os.environ.setdefault("GL_TEST_THREADS", str(args.threads))
    import host
    hst = host.boot()
    import torch
    dm, hn, ht = hst.pack("guiders.demo_model"), hst.pack("guiders.hypernet"), hst.pack("guiders.hypernet_train")
    model, clip, vae = dm.load_demo_model(dm.find_checkpoint("demo_model"))
    net = hn.load(args.resume) if args.resume else None
    earlier = []
    if net is not None:
        earlier = list(net.info.get("rounds", [])) + [{k: v for k, v in net.info.items() if k != "rounds"}]
    common = dict(source="demo subjects", subjects=args.subjects, layers=LAYERS, rank=4, width=128, depth=2,
                  learning_rate=args.learning_rate, subjects_per_step=args.subjects_per_step,
                  ref_images=args.ref_images, target_images=args.target_images, resolution=32,
                  output_reg=args.output_reg, min_snr_gamma=5.0, freeze_encoder=not args.train_encoder,
                  seed=args.seed, reference_contrast=args.reference_contrast, contrast_margin=args.contrast_margin,
                  loss_space="x0" if args.x0_loss else "native", subject_query=args.subject_query)
    t0 = time.perf_counter()
    steps = args.steps
    if args.basis:
        from pathlib import Path
        if net is None or not args.fits:
            raise SystemExit("--basis needs --resume (its encoder chooses and reads the prototypes) and --fits")
        fits = ht.load_fits(args.fits) if Path(args.fits).is_file() else None
        net = ht.build_basis(model, clip, vae, net, subjects=args.basis_pool, prototypes=args.basis, rank=4,
                             fit_steps=args.fit_steps, fit_learning_rate=args.fit_lr, fit_parallel=args.fit_parallel,
                             temperature=args.basis_temperature, seed=args.seed, fit_images=args.fit_images,
                             fits=fits, after_each=lambda f: ht.save_fits(f, args.fits), log=log)
        protos = net.info["basis"]["prototypes"]
        earlier = [dict(net.info)]          # the basis round (it holds the source network's settings)
        if steps == 0:
            net.info["command"] = " ".join(["python demo/train_hypernet.py",
                                            *recorded_args(sys.argv[1:] if argv is None else argv)])
            out = hn.save(net, args.out, half=args.half)
            log(f"wrote {out}: basis decoder from {len(protos)} prototype fits")
            return net.info
    elif args.fits:
        from pathlib import Path
        fits = ht.load_fits(args.fits) if Path(args.fits).is_file() else None
        if args.fit_subjects:
            fits = ht.fit_demo_subjects(model, clip, vae, list(range(args.fit_subjects)), layers=LAYERS, rank=4,
                                        steps=args.fit_steps, learning_rate=args.fit_lr, images=args.fit_images,
                                        fits=fits, parallel=args.fit_parallel,
                                        after_each=lambda f: ht.save_fits(f, args.fits), log=log)
        if args.regress_steps:
            if net is None or fits is None:
                raise SystemExit("--regress-steps needs --resume (a network to start from) and a --fits collection")
            net = ht.regress_hypernet(net, fits, steps=args.regress_steps, learning_rate=args.regress_lr,
                                      held_out=args.held_out, seed=args.seed, train_encoder=args.train_encoder,
                                      log=log)
        if steps == 0:
            if net is not None and args.regress_steps:
                net.info["command"] = " ".join(["python demo/train_hypernet.py",
                                                *recorded_args(sys.argv[1:] if argv is None else argv)])
                out = hn.save(net, args.out, half=args.half)
                log(f"wrote {out}: regression only")
                return net.info
            return {}
    if args.seconds > 0:           # two short runs: their difference is the time of the extra steps alone
        took = []
        for n in CALIBRATION_STEPS:
            t = time.perf_counter()
            ht.train_hypernet(model, clip, vae, steps=n, warmup=0, resume=net, encoder_pretrain_steps=0, **common)
            took.append(time.perf_counter() - t)
        per_step = max((took[1] - took[0]) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0]), 1e-4)
        steps = max(1, int((args.seconds - took[0]) / per_step))        # set-up time counted once
        log(f"calibration: {took[0]:.1f} s for {CALIBRATION_STEPS[0]} steps, {took[1]:.1f} s for "
            f"{CALIBRATION_STEPS[1]}: {per_step:.4f} s/step -> {steps} steps for {args.seconds:.0f} s")
    result = ht.train_hypernet(model, clip, vae, steps=steps, warmup=50, resume=net,
                               encoder_pretrain_steps=0 if net is not None else args.pretrain, **common,
                               log=log)
    seconds = time.perf_counter() - t0
    result.info.update({
        "command": " ".join(["python demo/train_hypernet.py",
                             *recorded_args(sys.argv[1:] if argv is None else argv)]),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "threads": args.threads, "torch": torch.__version__, "wall_seconds": round(seconds, 1)})
    if earlier:
        result.info["rounds"] = earlier
    out = hn.save(result, args.out, half=args.half)
    history = result.info["loss_history"]
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {steps} steps in {seconds:.0f} s; probe loss "
        f"{history[0][1]:.5f} -> {history[-1][1]:.5f}")
    log(json.dumps({k: v for k, v in result.info.items() if k not in ("loss_history", "rounds")})[:2000])
    return result.info


if __name__ == "__main__":
    main()
