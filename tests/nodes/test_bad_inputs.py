"""The bad-input matrix (issue 12): for every node that takes user input, invalid values and incompatible
combinations fail with a message naming the node, the input and the fix, and the same executor serves the next
prompt normally.

Each case builds a small API prompt, once with one input made bad and once fixed, and runs both through the real
host in-process exactly as the server does: `execution.validate_prompt` first (a prompt that fails there is
answered with node_errors and never queued), then `PromptExecutor.execute` on ONE executor shared by the whole
module (the server's prompt worker keeps a single executor and its output cache). After every failing prompt the
fixed prompt (or, where fixing needs a file or a long run, a small generic one) must run.

Stages: "validation" — our validate_inputs answers (the message is the `details` the UI shows on the node);
"host" — the host's own schema check answers (number range, missing input; it names the input, the node is the one
it is attached to; listed so the matrix shows those inputs are covered); "execution" — the node, or the sampler
running our guider/sampler, raises, and the exception message must carry the GL_ node id itself (the failing node
may be SamplerCustomAdvanced). ComfyUI 0.3.75 checks the option list of V1 combos only: a value of a V3 io.Combo
sent through the API reaches the node unchecked, so every node with a combo has an "unknown option" case.

Exempt (nothing invalid to pass): GL_NFECounter (one MODEL input; any model counts).
"""
from __future__ import annotations

import asyncio
import itertools
import math
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import host
import pytest

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "demo" / "weights"
# what a raw error from deep inside torch or Python looks like (the pack's messages never read like this)
RAW = re.compile(r"size mismatch|must match the size|mat1 and mat2|Expected .* but got|shape '\[|"
                 r"out of range|has no attribute|not subscriptable|unexpected keyword|NoneType|Traceback")
RAW_TYPES = ("RuntimeError", "IndexError", "KeyError", "AttributeError", "TypeError", "AssertionError",
             "ZeroDivisionError", "UnboundLocalError")
_SEEDS = itertools.count(1000)


# ------------------------------------------------------------------------------------------------ prompt builder

class Graph:
    """A tiny API-prompt builder: add(class_type, **inputs) -> node id; links are [node id, output slot]."""

    def __init__(self):
        self.nodes: dict = {}

    def add(self, class_type: str, **inputs) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"class_type": class_type, "inputs": dict(inputs)}
        return nid

    def tiny(self, arch="sd15_eps", seed=0):
        t = self.add("GL_TinyTestModel", architecture=arch, seed=seed)
        return [t, 0], [t, 1], [t, 2]

    def demo(self, checkpoint="demo_model"):
        d = self.add("GL_DemoModelLoader", checkpoint=checkpoint)
        return [d, 0], [d, 1], [d, 2]

    def text(self, clip, text: str):
        return [self.add("CLIPTextEncode", text=text, clip=clip), 0]

    def latent(self, width=64, height=None, batch=1):
        """EmptyLatentImage: the host divides by 8 (64 -> an 8x8 latent; the demo model: 128 -> 16x16)."""
        return [self.add("EmptyLatentImage", width=width, height=height or width, batch_size=batch), 0]

    def family(self, model, sampling="cosmos_rflow"):
        """The model with a parameterisation the pack's samplers cannot serve (core ModelSamplingContinuousEDM)."""
        return [self.add("ModelSamplingContinuousEDM", model=model, sampling=sampling, sigma_max=80.0,
                         sigma_min=0.002), 0]

    def preview(self, link) -> dict:
        self.add("PreviewAny", source=link)
        return self.nodes

    def ksampler(self, model, positive, negative, *, cfg=5.0, latent=None, steps=2) -> dict:
        k = self.add("KSampler", model=model, seed=next(_SEEDS), steps=steps, cfg=cfg, sampler_name="euler",
                     scheduler="normal", positive=positive, negative=negative,
                     latent_image=latent or self.latent(), denoise=1.0)
        return self.preview([k, 0])

    def cfg_guider(self, model, positive, negative, cfg=5.0):
        return [self.add("CFGGuider", model=model, positive=positive, negative=negative, cfg=cfg), 0]

    def custom(self, model, guider, sampler=None, *, latent=None, steps=2) -> dict:
        """SamplerCustomAdvanced (the sigmas come from `model`'s schedule)."""
        sampler = sampler or [self.add("KSamplerSelect", sampler_name="euler"), 0]
        sigmas = [self.add("BasicScheduler", model=model, scheduler="simple", steps=steps, denoise=1.0), 0]
        noise = [self.add("RandomNoise", noise_seed=next(_SEEDS)), 0]
        s = self.add("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                     latent_image=latent or self.latent())
        return self.preview([s, 0])


def generic_good() -> dict:
    g = Graph()
    model, pos, neg = g.tiny()
    a = g.add("GL_APG", model=model, eta=0.0, norm_threshold=15.0, momentum=-0.5, start_percent=0.0,
              end_percent=1.0, scale_threshold_by_size=False)
    return g.ksampler([a, 0], pos, neg)


# ------------------------------------------------------------------------------------------------ the server

@dataclass
class Answer:
    ok: bool
    stage: str = ""          # "validation" (node_errors) or "execution" (execution_error)
    text: str = ""           # what the user reads
    node_types: tuple = ()   # the node(s) the host attaches the error to
    exception_type: str = ""
    outputs: dict | None = None


class Server:
    """The server's two steps for one prompt, on one executor for the whole module."""

    def __init__(self):
        self.executor = host.new_executor()      # the server's default: classic output cache, kept across prompts

    def run(self, prompt: dict) -> Answer:
        import execution
        import torch
        prompt_id = uuid.uuid4().hex
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        rejected = None
        if not valid or node_errors:       # the server answers with node_errors (and still runs the valid outputs)
            lines, types = [], []
            for entry in node_errors.values():
                types.append(entry["class_type"])
                lines += [f"{e['message']}: {e['details']}" for e in entry["errors"]]
            if not lines:
                lines = [f"{error['message']}: {error['details']}"]
            rejected = Answer(False, "validation", "\n".join(lines), tuple(types))
            if not valid:
                return rejected
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.executor.execute(prompt, prompt_id, {}, outputs)
        finally:
            torch.set_num_threads(previous)
        errors = [data for event, data in self.executor.status_messages if event == "execution_error"]
        if rejected is not None:
            return rejected
        if errors:
            e = errors[0]
            return Answer(False, "execution", e["exception_message"].strip(), (e["node_type"],), e["exception_type"])
        assert self.executor.success
        return Answer(True, outputs=self.executor.history_result["outputs"])


@pytest.fixture(scope="module")
def server(host):
    return Server()


@pytest.fixture(scope="module", autouse=True)
def wrong_kind_files(host, tmp_path_factory):
    """A file of another kind under each loader's folder name (an AGD adapter posing as a classifier and as a
    hypernetwork, a hypernetwork posing as an AGD adapter), in a temporary folder registered like an
    extra_model_paths.yaml entry and removed afterwards."""
    import folder_paths
    root = tmp_path_factory.mktemp("wrong_kind")
    kinds = {"gl_classifiers": ("guiders.classifier", "classifier_folders", "demo_agd.safetensors"),
             "gl_hypernetworks": ("guiders.hypernet", "folders", "demo_agd.safetensors"),
             "gl_agd": ("guiders.agd", "folders", "demo_hypernet.safetensors")}
    added = []
    for kind, (module, register, source) in kinds.items():
        getattr(host.pack(module), register)()          # the pack's default folder first, as in a real session
        folder = root / kind
        folder.mkdir()
        shutil.copy(WEIGHTS / source, folder / "wrong_kind.safetensors")
        folder_paths.add_model_folder_path(kind, str(folder))
        added.append((kind, str(folder)))
    yield
    for kind, folder in added:
        paths = folder_paths.folder_names_and_paths[kind][0]
        if folder in paths:
            paths.remove(folder)
        # the host caches each folder name's file list while its folders' mtimes stand still: drop it, so the
        # loaders' option lists of later tests no longer offer wrong_kind.safetensors
        folder_paths.filename_list_cache.pop(kind, None)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def clip_vision_hypernets(host, demo_model, tmp_path_factory):
    """Two untrained clip_vision hypernetworks for the demo model in a temporary gl_hypernetworks folder:
    cv_tiny.safetensors reads GL_TinyCLIPVision's features (17 tokens × 32 wide), cv_wide.safetensors features 64
    wide (as a hypernetwork trained with another CLIP vision model)."""
    import folder_paths
    import torch
    hn = host.pack("guiders.hypernet")
    hn.folders()
    folder = tmp_path_factory.mktemp("cv_hypernets")
    targets = hn.targets_for(demo_model[0], "attention")
    for name, dim in (("cv_tiny", 32), ("cv_wide", 64)):
        with torch.inference_mode(False):
            module = hn.hk.HyperNetwork(targets, {"width": 32, "heads": 2, "depth": 1, "encoder": "clip_vision",
                                                  "feature_dim": dim, "feature_tokens": 17})
        hn.save(hn.Hypernet(module, "UNet", "attention", name), folder / f"{name}.safetensors")
    folder_paths.add_model_folder_path("gl_hypernetworks", str(folder))
    folder_paths.filename_list_cache.pop("gl_hypernetworks", None)
    yield
    paths = folder_paths.folder_names_and_paths["gl_hypernetworks"][0]
    if str(folder) in paths:
        paths.remove(str(folder))
    folder_paths.filename_list_cache.pop("gl_hypernetworks", None)
    shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the cases

@dataclass
class Case:
    node: str                          # the GL_ node the message must name
    build: Callable[[bool], dict]      # build(bad) -> API prompt; build(False) is the fixed prompt
    input: str                         # regex: the offending input or value, as the message names it
    fix: str                           # regex: what to do
    stage: str                         # "validation", "host" or "execution"
    fixed_runs: bool = True            # False: the fixed prompt needs a file/long run; run generic_good instead


CASES: list = []


def case(node: str, input: str, fix: str, stage: str, *, fixed_runs: bool = True):
    def register(fn):
        CASES.append(pytest.param(Case(node, fn, input, fix, stage, fixed_runs), id=fn.__name__))
        return fn
    return register


def pick(bad: bool, bad_value, good_value):
    return bad_value if bad else good_value


def _apg(g, model, **over):
    inputs = dict(model=model, eta=0.0, norm_threshold=15.0, momentum=-0.5, start_percent=0.0, end_percent=1.0,
                  scale_threshold_by_size=False)
    inputs.update(over)
    return [g.add("GL_APG", **inputs), 0]


# GL_APG --------------------------------------------------------------------------------------------------------
@case("GL_APG", r"start_percent \(0\.6\)", r"must be smaller than end_percent.*set e\.g\. 0 and 1", "validation")
def apg_start_after_end(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.ksampler(_apg(g, model, start_percent=pick(bad, 0.6, 0.0), end_percent=pick(bad, 0.4, 1.0)), pos, neg)


@case("GL_APG", r"end_percent \(1\.5\)", r"must lie in \[0, 1\]", "validation")
def apg_end_out_of_range(bad):
    g = Graph()
    model, pos, neg = g.tiny("flux")
    return g.ksampler(_apg(g, model, end_percent=pick(bad, 1.5, 1.0)), pos, neg)


@case("GL_APG", r"cfg = 0", r"use cfg > 0", "execution")
def apg_cfg_zero(bad):
    g = Graph()
    model, pos, neg = g.tiny("sd15_v")
    return g.ksampler(_apg(g, model), pos, neg, cfg=pick(bad, 0.0, 7.0))


@case("GL_APG", r"momentum", r"bigger than max of 0\.99", "host")
def apg_momentum_out_of_range(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.ksampler(_apg(g, model, momentum=pick(bad, 1.0, -0.5)), pos, neg)


# GL_SamplerCFGPP -----------------------------------------------------------------------------------------------
def _cfgpp(g, sampler_name="euler"):
    return [g.add("GL_SamplerCFGPP", sampler_name=sampler_name, eta=1.0, s_noise=1.0), 0]


@case("GL_SamplerCFGPP", r"cfg = 7(\.0)? is read as CFG\+\+'s λ", r"Set cfg to about 0\.6", "execution")
def cfgpp_cfg_read_as_lambda(bad):
    g = Graph()
    model, pos, neg = g.tiny("sd3")
    return g.custom(model, g.cfg_guider(model, pos, neg, cfg=pick(bad, 7.0, 0.6)), _cfgpp(g))


@case("GL_SamplerCFGPP", r"no negative \(unconditional\) conditioning", r"connect a negative prompt", "execution")
def cfgpp_missing_negative(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    guider = ([g.add("BasicGuider", model=model, conditioning=pos), 0] if bad
              else g.cfg_guider(model, pos, neg, cfg=0.6))
    return g.custom(model, guider, _cfgpp(g, "euler_ancestral"))


@case("GL_SamplerCFGPP", r"unknown sampler_name 'dpmpp_3m_sde'", r"choose one of euler", "execution")
def cfgpp_unknown_sampler(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.custom(model, g.cfg_guider(model, pos, neg, cfg=0.6), _cfgpp(g, pick(bad, "dpmpp_3m_sde", "dpmpp_2m")))


@case("GL_SamplerCFGPP", r"model parameterisation .*COSMOS_RFLOW", r"supported: EPS, V-prediction and flow",
      "execution")
def cfgpp_unsupported_family(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    model = g.family(model, pick(bad, "cosmos_rflow", "v_prediction"))
    return g.custom(model, g.cfg_guider(model, pos, neg, cfg=0.6), _cfgpp(g))


# GL_AdaptiveGuidance -------------------------------------------------------------------------------------------
def _ag(g, model, **over):
    inputs = dict(model=model, threshold=0.99, start_percent=0.0, end_percent=1.0, batch_policy="all",
                  space="denoised")
    inputs.update(over)
    return [g.add("GL_AdaptiveGuidance", **inputs), 0]


@case("GL_AdaptiveGuidance", r"end_percent \(0\.2\)", r"use end_percent = 1", "validation")
def ag_end_before_start(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.ksampler(_ag(g, model, start_percent=0.7, end_percent=pick(bad, 0.2, 1.0)), pos, neg)


@case("GL_AdaptiveGuidance", r"threshold \(nan\)", r"0\.985 is the default", "execution")
def ag_threshold_not_a_number(bad):
    g = Graph()
    model, pos, neg = g.tiny("flux")
    return g.ksampler(_ag(g, model, threshold=pick(bad, math.nan, 0.99)), pos, neg)


@case("GL_AdaptiveGuidance", r"space 'latent'", r"is not one of \['denoised', 'noise'\]", "execution")
def ag_unknown_space(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.ksampler(_ag(g, model, space=pick(bad, "latent", "noise"), threshold=0.9999), pos, neg)


@case("GL_AdaptiveGuidance", r"model parameterisation .*COSMOS_RFLOW", r"supported: EPS", "execution")
def ag_unsupported_family(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.ksampler(_ag(g, g.family(model, pick(bad, "cosmos_rflow", "eps"))), pos, neg)


# GL_LinearAGCalibrate, GL_LinearAG, GL_LinearAGLoad -------------------------------------------------------------
def _calibrate(g, *, prompts="a red circle\na blue square", cfg=5.0, steps=3, negative=True, latent=None,
               model=None, clip=None, prefix="bad_inputs_lag"):
    if model is None:
        model, clip, _vae = g.demo()
    inputs = dict(model=model, clip=clip, prompts=prompts, latent=latent or g.latent(128), seed=0, steps=steps,
                  cfg=cfg, sampler_name="euler", scheduler="simple", filename_prefix=prefix)
    if negative:
        inputs["negative"] = g.text(clip, "")
    return g.add("GL_LinearAGCalibrate", **inputs)


@case("GL_LinearAGCalibrate", r"prompts has 1 non-empty line", r"write at least 2 prompts, one per line", "validation")
def lag_calibrate_one_prompt(bad):
    g = Graph()
    c = _calibrate(g, prompts=pick(bad, "a red circle\n\n", "a red circle\na blue square"))
    return g.preview([c, 1])


@case("GL_LinearAGCalibrate", r"cfg \(1\.0\)", r"use your sampler's cfg", "execution")
def lag_calibrate_cfg_one(bad):
    g = Graph()
    return g.preview([_calibrate(g, cfg=pick(bad, 1.0, 5.0)), 1])


@case("GL_LinearAGCalibrate", r"negative", r"Required input is missing", "host")
def lag_calibrate_missing_negative(bad):
    g = Graph()
    return g.preview([_calibrate(g, negative=not bad), 1])


@case("GL_LinearAGCalibrate", r"latent .*\[1, 16, 1, 2, 2\]|latent .*5-D|latent .*video", r"EmptyLatentImage",
      "execution")
def lag_calibrate_video_latent(bad):
    g = Graph()
    latent = ([g.add("EmptyHunyuanLatentVideo", width=16, height=16, length=1, batch_size=1), 0] if bad
              else g.latent(128))
    return g.preview([_calibrate(g, latent=latent), 1])


@case("GL_LinearAGCalibrate", r"filename_prefix \('/tmp/lag'\)", r"relative name without '\.\.'", "validation")
def lag_calibrate_absolute_prefix(bad):
    g = Graph()
    return g.preview([_calibrate(g, prefix=pick(bad, "/tmp/lag", "bad_inputs/lag")), 1])


@case("GL_LinearAG", r"calibrated for 3 steps.*samples 2 steps", r"Calibrate with the same steps", "execution")
def lag_coefficients_for_other_steps(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    c = _calibrate(g, model=model, clip=clip, steps=3)
    lag = g.add("GL_LinearAG", model=model, first_fraction=0.5, tau=0.05, coefficients=[c, 0])
    return g.ksampler([lag, 0], g.text(clip, "a red circle"), g.text(clip, ""), latent=g.latent(128),
                      steps=pick(bad, 2, 3))


@case("GL_LinearAG", r"tau \(nan\)", r"finite number > 0", "execution")
def lag_tau_not_a_number(bad):
    g = Graph()
    model, pos, neg = g.tiny("sd3")
    lag = g.add("GL_LinearAG", model=model, first_fraction=0.5, tau=pick(bad, math.nan, 0.05))
    return g.ksampler([lag, 0], pos, neg)


@case("GL_LinearAGLoad", r"'missing_00001_\.safetensors' not found", r"run GL_LinearAGCalibrate first",
      "validation", fixed_runs=False)
def lag_load_missing_file(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    load = g.add("GL_LinearAGLoad", file="missing_00001_.safetensors")
    lag = g.add("GL_LinearAG", model=model, first_fraction=0.5, tau=0.05, coefficients=[load, 0])
    return g.ksampler([lag, 0], pos, neg)


# GL_SamplerFKC, GL_FKCGuider -------------------------------------------------------------------------------------
def _fkc(g, **over):
    inputs = dict(particles=2, propagation="ddpm", resample="every_step", kappa=0.5, temperature=1.0, clamp=2.0,
                  start_percent=0.0, end_percent=1.0, output="best")
    inputs.update(over)
    return [g.add("GL_SamplerFKC", **inputs), 0]


@case("GL_SamplerFKC", r"propagation 'euler' is deterministic", r"choose ddpm or euler_maruyama", "validation")
def fkc_deterministic_propagation(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.custom(model, g.cfg_guider(model, pos, neg, 3.0), _fkc(g, propagation=pick(bad, "euler", "ddpm")))


@case("GL_SamplerFKC", r"start_percent \(0\.8\) is after end_percent \(0\.2\)", r"set e\.g\. 0 and 1", "validation")
def fkc_start_after_end(bad):
    g = Graph()
    model, pos, neg = g.tiny("flux")
    return g.custom(model, g.cfg_guider(model, pos, neg, 3.0),
                    _fkc(g, start_percent=pick(bad, 0.8, 0.0), end_percent=pick(bad, 0.2, 1.0)))


@case("GL_SamplerFKC", r"model parameterisation .*COSMOS_RFLOW", r"supported: EPS", "execution")
def fkc_unsupported_family(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    model = g.family(model, pick(bad, "cosmos_rflow", "eps"))
    return g.custom(model, g.cfg_guider(model, pos, neg, 3.0), _fkc(g))


@case("GL_SamplerFKC", r"unknown output 'mean'", r"choose one of \('best', 'sample', 'all'\)", "execution")
def fkc_unknown_output(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.custom(model, g.cfg_guider(model, pos, neg, 3.0), _fkc(g, output=pick(bad, "mean", "sample")))


@case("GL_SamplerFKC", r"Guider_DualCFG", r"GL_FKCGuider", "execution")
def fkc_with_dual_cfg_guider(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    guider = ([g.add("DualCFGGuider", model=model, cond1=pos, cond2=pos, negative=neg, cfg_conds=3.0,
                     cfg_cond2_negative=3.0, style="regular"), 0] if bad else g.cfg_guider(model, pos, neg, 3.0))
    return g.custom(model, guider, _fkc(g))


def _fkc_guider(g, model, mode, positive, *, beta=3.0, **conds):
    return [g.add("GL_FKCGuider", model=model, mode=mode, positive=positive, beta=beta, **conds), 0]


@case("GL_FKCGuider", r"mode 'product' needs a second prompt \(positive_2\)", r"connect it or choose another mode",
      "execution")
def fkc_guider_product_without_second_prompt(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    conds = {} if bad else {"positive_2": neg}
    return g.custom(model, _fkc_guider(g, model, "product", pos, **conds), _fkc(g))


@case("GL_FKCGuider", r"mode 'composition' needs a negative prompt \(negative\)", r"connect it", "execution")
def fkc_guider_composition_without_negative(bad):
    g = Graph()
    model, pos, neg = g.tiny("sd15_v")
    conds = {"positive_2": pos} if bad else {"positive_2": pos, "negative": neg}
    return g.custom(model, _fkc_guider(g, model, "composition", pos, **conds), _fkc(g))


@case("GL_FKCGuider", r"unknown mode 'ratio'", r"choose one of cfg, product", "execution")
def fkc_guider_unknown_mode(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.custom(model, _fkc_guider(g, model, pick(bad, "ratio", "cfg"), pos, negative=neg), _fkc(g))


@case("GL_FKCGuider", r"annealing needs beta > 0.*got 0(\.0)?", r"try 2 \(sharper\) or 0\.5", "validation")
def fkc_guider_annealing_beta_zero(bad):
    g = Graph()
    model, pos, _neg = g.tiny()
    return g.custom(model, _fkc_guider(g, model, "annealing", pos, beta=pick(bad, 0.0, 2.0)), _fkc(g))


@case("GL_FKCGuider", r"mode 'product' has no finite target at σ = 1", r"Use GL_SamplerFKC", "execution")
def fkc_guider_product_from_sigma_one_with_a_core_sampler(bad):
    g = Graph()
    model, pos, neg = g.tiny("flux")
    sampler = [g.add("KSamplerSelect", sampler_name="euler"), 0] if bad else _fkc(g)
    return g.custom(model, _fkc_guider(g, model, "product", pos, positive_2=neg), sampler)


# GL_ClassifierLoader, GL_ClassifierGuidance, GL_GradientFreeGuidance, GL_DynamicCFG ----------------------------
def _classifier(g, name="demo_classifier.safetensors"):
    return [g.add("GL_ClassifierLoader", classifier=name), 0]


def _cg(g, model, classifier, **over):
    inputs = dict(model=model, classifier=classifier, target="red circle", scale=1.0, joint_temperature=1.0,
                  marginal_discount=0.5, softplus_beta=3.0, gamma=0.3, schedule="sine", decoder="auto",
                  start_percent=0.0, end_percent=1.0)
    inputs.update(over)
    return [g.add("GL_ClassifierGuidance", **inputs), 0]


def _demo_ksampler(g, model, clip, *, width=128, height=None, cfg=3.0):
    return g.ksampler(model, g.text(clip, "a red circle"), g.text(clip, ""), cfg=cfg,
                      latent=g.latent(width, height))


@case("GL_ClassifierLoader", r"'missing\.safetensors' not found", r"put \.safetensors classifiers into "
      r"models/classifiers/", "validation")
def classifier_missing_file(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, _cg(g, model, _classifier(g, pick(bad, "missing.safetensors",
                                                                  "demo_classifier.safetensors"))), clip)


@case("GL_ClassifierLoader", r"wrong_kind\.safetensors is not a supported classifier", r"supported: torchvision ResNet",
      "execution")
def classifier_wrong_kind_of_file(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, _cg(g, model, _classifier(g, pick(bad, "wrong_kind.safetensors",
                                                                  "demo_classifier.safetensors"))), clip)


@case("GL_ClassifierGuidance", r"the image is 16×8", r"sample at a 32:32 aspect ratio", "execution")
def classifier_guidance_wrong_resolution(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, _cg(g, model, _classifier(g)), clip, width=128, height=pick(bad, 64, 128))


@case("GL_ClassifierGuidance", r"target 'teal hexagon' is not a class", r"use a label name or an index", "execution")
def classifier_guidance_unknown_target(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, _cg(g, model, _classifier(g), target=pick(bad, "teal hexagon", "blue square")), clip)


@case("GL_ClassifierGuidance", r"target is empty", r"name a class of the classifier", "validation")
def classifier_guidance_empty_target(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, _cg(g, model, _classifier(g), target=pick(bad, "  ", "red circle")), clip)


@case("GL_ClassifierGuidance", r"decoder 'identity' needs a pixel-space model", r"use 'linear' or 'auto'", "execution")
def classifier_guidance_identity_on_latent_model(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    if bad:                                       # a latent model: SDXL Playground's 4-channel latent format
        model = g.family(model, "edm_playground_v2.5")
    return g.ksampler(_cg(g, model, _classifier(g), decoder="identity"), pos, neg)


@case("GL_ClassifierGuidance", r"decoder 'vae' needs a VAE", r"connect the checkpoint's VAE, or a TAESD",
      "execution")
def classifier_guidance_vae_decoder_without_a_vae(bad):
    g = Graph()
    model, clip, vae = g.demo()
    extra = {} if bad else {"vae": vae}
    return _demo_ksampler(g, _cg(g, model, _classifier(g), decoder="vae", **extra), clip)


def _zero_shot(g, clip, *, projection_dim=96, labels="red circle, blue square"):
    vision = [g.add("GL_TinyCLIPVision", projection_dim=projection_dim, seed=0), 0]
    return [g.add("GL_CLIPZeroShotClassifier", clip_vision=vision, clip=clip, labels=labels,
                  prompt_template="a {label}", text_encoder="auto", logit_scale=100.0), 0]


@case("GL_CLIPZeroShotClassifier", r"no text tower of the CLIP has the image embedding's width 64",
      r"pair CLIP vision ViT-bigG with SDXL's CLIP", "execution")
def zero_shot_widths_differ(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, _cg(g, model, _zero_shot(g, clip, projection_dim=pick(bad, 64, 96))), clip)


@case("GL_CLIPZeroShotClassifier", r"labels is empty", r"name the classes, separated by commas", "validation")
def zero_shot_empty_labels(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, _cg(g, model, _zero_shot(g, clip, labels=pick(bad, " ,", "red circle, blue square"))),
                          clip)


def _gfcg(g, model, clip, classifier, **over):
    inputs = dict(model=model, positive=g.text(clip, "a red circle"), negative=g.text(clip, ""), clip=clip,
                  classifier=classifier, target="red circle", classes="red circle, red square, blue circle",
                  prompt_template="a {label}", cfg=3.0, s_max=2.0, start_percent=0.0, end_percent=1.0,
                  decoder="auto")
    inputs.update(over)
    return [g.add("GL_GradientFreeGuidance", **inputs), 0]


@case("GL_GradientFreeGuidance", r"prompt_template 'a photo' has no \{label\}",
      r"write e\.g\. 'a photo of a \{label\}'", "validation")
def gfcg_template_without_label(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return g.custom(model, _gfcg(g, model, clip, _classifier(g), prompt_template=pick(bad, "a photo", "a {label}")),
                    latent=g.latent(128))


@case("GL_GradientFreeGuidance", r"classes \('red circle'\)", r"list at least two", "execution")
def gfcg_single_candidate_class(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return g.custom(model, _gfcg(g, model, clip, _classifier(g),
                                 classes=pick(bad, "red circle", "red circle, red square")), latent=g.latent(128))


@case("GL_GradientFreeGuidance", r"target 'purple blob' is not a class", r"use a label name or an index", "execution")
def gfcg_unknown_target(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return g.custom(model, _gfcg(g, model, clip, _classifier(g), target=pick(bad, "purple blob", "red circle")),
                    latent=g.latent(128))


@case("GL_GradientFreeGuidance", r"decoder 'identity' needs a pixel-space model", r"use 'linear' or 'auto'",
      "execution")
def gfcg_identity_on_latent_model(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    if bad:                                       # a latent model: SDXL Playground's 4-channel latent format
        model = g.family(model, "edm_playground_v2.5")
    return g.custom(model, _gfcg(g, model, clip, _classifier(g), decoder="identity"), latent=g.latent(128))


@case("GL_GradientFreeGuidance", r"decoder 'rgb'", r"'auto' picks for the model", "execution")
def gfcg_unknown_decoder(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return g.custom(model, _gfcg(g, model, clip, _classifier(g), decoder=pick(bad, "rgb", "auto")),
                    latent=g.latent(128))


def _dcfg(g, model, **over):
    inputs = dict(model=model, multipliers="0.5, 1, 1.5", max_change=1.0, alignment_weight=1.0,
                  fidelity_weight=1.0, start_percent=0.0, end_percent=0.7, decoder="auto")
    inputs.update(over)
    return [g.add("GL_DynamicCFG", **inputs), 0]


@case("GL_DynamicCFG", r"multipliers '2'", r"at least two non-negative values, e\.g\.", "validation")
def dynamic_cfg_single_multiplier(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.ksampler(_dcfg(g, model, multipliers=pick(bad, "2", "1, 2")), pos, neg)


@case("GL_DynamicCFG", r"classifier is connected but target is empty", r"name its class", "execution")
def dynamic_cfg_classifier_without_target(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, _dcfg(g, model, classifier=_classifier(g), target=pick(bad, "", "red circle")), clip)


@case("GL_DynamicCFG", r"alignment_weight \(0(\.0)?\) and fidelity_weight \(0(\.0)?\)", r"not both 0", "execution")
def dynamic_cfg_all_weights_zero(bad):
    g = Graph()
    model, pos, neg = g.tiny("sd3")
    return g.ksampler(_dcfg(g, model, alignment_weight=0.0, fidelity_weight=pick(bad, 0.0, 1.0)), pos, neg)


@case("GL_DynamicCFG", r"decoder 'identity' needs a pixel-space model", r"use 'linear' or 'auto'", "execution")
def dynamic_cfg_identity_on_latent_model(bad):
    g = Graph()
    model, pos, neg = g.tiny("flux")
    if bad:
        model = g.family(model, "edm_playground_v2.5")
    return g.ksampler(_dcfg(g, model, decoder="identity"), pos, neg)


@case("GL_DynamicCFG", r"decoder 'rgb'", r"'auto' picks for the model", "execution")
def dynamic_cfg_unknown_decoder(bad):
    g = Graph()
    model, pos, neg = g.tiny("sd3")
    return g.ksampler(_dcfg(g, model, decoder=pick(bad, "rgb", "linear")), pos, neg)


# GL_DemoModelLoader --------------------------------------------------------------------------------------------
@case("GL_DemoModelLoader", r"checkpoint 'demo_model_v9'", r"choose one of", "validation")
def demo_loader_unknown_checkpoint(bad):
    g = Graph()
    model, clip, _vae = g.demo(pick(bad, "demo_model_v9", "demo_model"))
    return _demo_ksampler(g, model, clip)


# GL_SamplerDiffIER ---------------------------------------------------------------------------------------------
def _diffier(g, **over):
    inputs = dict(sampler_name="euler", iterations=1, step_size=0.5, tolerance=1e-3, start_percent=0.0,
                  end_percent=0.5, objective="noise energy gap (Guidance Lab design)")
    inputs.update(over)
    return [g.add("GL_SamplerDiffIER", **inputs), 0]


@case("GL_SamplerDiffIER", r"start_percent \(0\.9\) is after end_percent \(0\.1\)", r"swap them", "validation")
def diffier_start_after_end(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.custom(model, g.cfg_guider(model, pos, neg),
                    _diffier(g, start_percent=pick(bad, 0.9, 0.1), end_percent=pick(bad, 0.1, 0.9)))


@case("GL_SamplerDiffIER", r"sampler_name 'dpmpp_2m' is not offered", r"choose one of euler, euler_ancestral",
      "execution")
def diffier_multistep_sampler(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.custom(model, g.cfg_guider(model, pos, neg), _diffier(g, sampler_name=pick(bad, "dpmpp_2m", "heun")))


@case("GL_SamplerDiffIER", r"model parameterisation .*COSMOS_RFLOW", r"supported: EPS", "execution")
def diffier_unsupported_family(bad):
    g = Graph()
    model, pos, neg = g.tiny("sd3")
    model = g.family(model, pick(bad, "cosmos_rflow", "v_prediction"))
    return g.custom(model, g.cfg_guider(model, pos, neg), _diffier(g))


# GL_MultiConditionGuider ---------------------------------------------------------------------------------------
def _mc(g, model, pos, neg, **over):
    inputs = dict(model=model, negative=neg, condition_1=pos, condition_2=pos, form="nested", scale_1=5.0,
                  scale_2=3.0, refresh_every=1)
    inputs.update(over)
    return [g.add("GL_MultiConditionGuider", **inputs), 0]


@case("GL_MultiConditionGuider", r"start_2 \(0\.8\) must be smaller than end_2 \(0\.3\)", r"smaller than end_2",
      "validation")
def multi_condition_window(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.custom(model, _mc(g, model, pos, neg, start_2=pick(bad, 0.8, 0.3), end_2=pick(bad, 0.3, 0.8)))


@case("GL_MultiConditionGuider", r"refresh_every > 1", r"set it to 1 for composable", "validation")
def multi_condition_refresh_with_composable(bad):
    g = Graph()
    model, pos, neg = g.tiny("flux")
    return g.custom(model, _mc(g, model, pos, neg, form="composable", refresh_every=pick(bad, 2, 1)))


@case("GL_MultiConditionGuider", r"condition_4 is connected but condition_3 is not", r"connect the conditions in order",
      "execution")
def multi_condition_gap(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    extra = {"condition_4": neg} if bad else {"condition_3": neg}
    return g.custom(model, _mc(g, model, pos, neg, **extra))


@case("GL_MultiConditionGuider", r"form 'nested \(combined\)' is not one of", r"choose one of 'nested'",
      "validation")
def multi_condition_unknown_form(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.custom(model, _mc(g, model, pos, neg, form=pick(bad, "nested (combined)", "nested (combine inputs)")))


# GL_MultiModelGuider -------------------------------------------------------------------------------------------
def _mm(g, model, pos, mode, **over):
    inputs = dict(model=model, positive=pos, mode=mode, cfg=2.0, scale_2=1.0, start_percent=0.0, end_percent=1.0,
                  max_ratio=0.0)
    inputs.update(over)
    return [g.add("GL_MultiModelGuider", **inputs), 0]


@case("GL_MultiModelGuider", r"mode 'npo' needs a negative conditioning", r"connect the negative input", "execution")
def multi_model_npo_without_negative(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    weak, _p, _n = g.tiny(seed=1)
    extra = {} if bad else {"negative": neg}
    return g.custom(model, _mm(g, model, pos, "npo", model_2=weak, **extra))


@case("GL_MultiModelGuider", r"scale_2 is v, the fine-tuned share, in \[0, 1\]; got 2", r"in \[0, 1\]", "validation")
def multi_model_sine_share(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    tuned, _p, _n = g.tiny(seed=1)
    return g.custom(model, _mm(g, model, pos, "sine", model_2=tuned, negative=neg, scale_2=pick(bad, 2.0, 0.5),
                               end_percent=0.6))


@case("GL_MultiModelGuider", r"model is eps but model_2 is flow", r"same parameterisation", "execution")
def multi_model_family_mismatch(bad):
    g = Graph()
    model, pos, _neg = g.tiny()
    weak, _p, _n = g.tiny(pick(bad, "flux", "sd15_eps"), seed=1)
    return g.custom(model, _mm(g, model, pos, "autoguidance", model_2=weak))


@case("GL_MultiModelGuider", r"mode 'autoguidance' needs", r"connect model_2", "execution")
def multi_model_autoguidance_without_weak_model(bad):
    g = Graph()
    model, pos, _neg = g.tiny()
    weak, _p, _n = g.tiny(seed=1)
    extra = {} if bad else {"model_2": weak}
    return g.custom(model, _mm(g, model, pos, "autoguidance", **extra))


@case("GL_MultiModelGuider", r"unknown mode 'weak'", r"choose one of autoguidance", "execution")
def multi_model_unknown_mode(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    return g.custom(model, _mm(g, model, pos, pick(bad, "weak", "cfg"), negative=neg))


# GL_ConceptErase, GL_SaveErasureLoRA, GL_ConceptEraseTrain -------------------------------------------------------
def _erase(g, model, clip, **over):
    inputs = dict(model=model, clip=clip, erase="circle", alternative="", preserve="", erase_scale=1.0,
                  preserve_scale=1.0, lam=0.5, token_mode="last_content", templates="none",
                  custom_templates="a {}", targets="K+V", protect_uncond=True, uncond_prompts="", strength=1.0)
    inputs.update(over)
    return g.add("GL_ConceptErase", **inputs)


@case("GL_ConceptErase", r"reads 64-wide inputs but the CLIP gives 96",
      r"connect the text encoder\(s\) of this checkpoint", "execution")
def concept_erase_clip_of_another_model(bad):
    g = Graph()
    demo, clip, _vae = g.demo()
    tiny, pos, neg = g.tiny()
    e = _erase(g, pick(bad, tiny, demo), clip)
    return g.ksampler([e, 0], pos, neg) if bad else _demo_ksampler(g, [e, 0], clip)


@case("GL_ConceptErase", r"custom_templates", r"one template per line, each with exactly one '\{\}'", "execution")
def concept_erase_template_without_slot(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, [_erase(g, model, clip, templates="custom",
                                     custom_templates=pick(bad, "a photo", "a photo of a {}")), 0], clip)


@case("GL_ConceptErase", r"alternative has 2 entries for 3", r"give one alternative for all, one per erased concept",
      "execution")
def concept_erase_alternative_count(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, [_erase(g, model, clip, erase="circle; square; star",
                                     alternative=pick(bad, "heart; moon", "diamond")), 0], clip)


@case("GL_ConceptErase", r"targets 'Q'", r"choose one of K\+V", "execution")
def concept_erase_unknown_targets(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, [_erase(g, model, clip, targets=pick(bad, "Q", "V only")), 0], clip)


def _save_lora(g, erasure, prefix="bad_inputs/erasure"):
    return g.add("GL_SaveErasureLoRA", erasure=erasure, filename_prefix=prefix, rank=0, energy=0.999,
                 save_to="output")


@case("GL_SaveErasureLoRA", r"the erasure is empty", r"name at least one concept", "execution")
def save_erasure_nothing_erased(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    _save_lora(g, [_erase(g, model, clip, erase=pick(bad, "  ", "circle")), 1])
    return g.nodes


@case("GL_SaveErasureLoRA", r"filename_prefix \('\.\./\.\./escape'\)", r"relative name without '\.\.'", "validation")
def save_erasure_prefix_outside_output(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    _save_lora(g, [_erase(g, model, clip), 1], prefix=pick(bad, "../../escape", "bad_inputs/escape"))
    return g.nodes


@case("GL_SaveErasureLoRA", r"save_to 'models'", r"choose one of 'loras', 'output'", "validation")
def save_erasure_unknown_folder(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    _save_lora(g, [_erase(g, model, clip), 1])
    g.nodes[str(len(g.nodes))]["inputs"]["save_to"] = pick(bad, "models", "output")
    return g.nodes


def _erase_train(g, model, clip, latent=None, **over):
    inputs = dict(model=model, clip=clip, latent=latent or g.latent(128), erase="circle", alternative="",
                  preserve="", steps=1, learning_rate=1e-4, rank=1, batch=1, eta=1.0, lambda_u=1.0, lambda_p=0.5,
                  trajectories=1, trajectory_steps=2, trajectory_cfg=5.0, trainable="auto", seed=0)
    inputs.update(over)
    return g.add("GL_ConceptEraseTrain", **inputs)


@case("GL_ConceptEraseTrain", r"erase is empty", r"name the concept\(s\) to erase", "execution")
def concept_erase_train_nothing_to_erase(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, [_erase_train(g, model, clip, erase=pick(bad, " ; ", "circle")), 0], clip)


@case("GL_ConceptEraseTrain", r"trainable 'text input \(SD3/Flux\)' is for SD3/Flux", r"choose", "execution")
def concept_erase_train_trainable_of_other_family(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, [_erase_train(g, model, clip, trainable=pick(bad, "text input (SD3/Flux)", "attn2 k/v")),
                              0], clip)


@case("GL_ConceptEraseTrain", r"latent .*\[1, 16, 1, 2, 2\]|latent .*5-D|latent .*video", r"EmptyLatentImage",
      "execution")
def concept_erase_train_video_latent(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    latent = ([g.add("EmptyHunyuanLatentVideo", width=16, height=16, length=1, batch_size=1), 0] if bad
              else g.latent(128))
    return _demo_ksampler(g, [_erase_train(g, model, clip, latent=latent), 0], clip)


# GL_HypernetworkLoader, GL_Personalize, GL_HypernetworkTrain, GL_HypernetworkBasis ------------------------------
def _hypernet(g, name="demo_hypernet.safetensors"):
    return [g.add("GL_HypernetworkLoader", hypernetwork=name), 0]


def _subject(g, size=32):
    return [g.add("GL_DemoSubjectImages", subject=0, split="heldout", count=2, start=0, size=size), 0]


@case("GL_HypernetworkLoader", r"'nope\.safetensors' not found", r"put \.safetensors hypernetworks into "
      r"models/gl_hypernetworks/", "validation")
def hypernet_missing_file(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    p = g.add("GL_Personalize", model=model, images=_subject(g),
              hypernetwork=_hypernet(g, pick(bad, "nope.safetensors", "demo_hypernet.safetensors")), strength=1.0)
    return _demo_ksampler(g, [p, 0], clip)


@case("GL_HypernetworkLoader", r"'wrong_kind\.safetensors' is not a Guidance Lab hypernetwork",
      r"pick a file written by GL_HypernetworkTrain", "execution")
def hypernet_wrong_kind_of_file(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    p = g.add("GL_Personalize", model=model, images=_subject(g),
              hypernetwork=_hypernet(g, pick(bad, "wrong_kind.safetensors", "demo_hypernet.safetensors")),
              strength=1.0)
    return _demo_ksampler(g, [p, 0], clip)


@case("GL_Personalize", r"trained for a UNet model .* this Flux model", r"use the base model the hypernetwork was "
      r"trained on", "execution")
def personalize_other_family(bad):
    g = Graph()
    demo, clip, _vae = g.demo()
    tiny, pos, neg = g.tiny("flux")
    p = g.add("GL_Personalize", model=pick(bad, tiny, demo), images=_subject(g), hypernetwork=_hypernet(g),
              strength=1.0)
    return g.ksampler([p, 0], pos, neg) if bad else _demo_ksampler(g, [p, 0], clip)


@case("GL_Personalize", r"subject images of 4×4 pixels are too small", r"at least 8×8", "execution")
def personalize_tiny_images(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    size = pick(bad, 4, 16)
    images = [g.add("EmptyImage", width=size, height=size, batch_size=1, color=0xff0000), 0]
    p = g.add("GL_Personalize", model=model, images=images, hypernetwork=_hypernet(g), strength=1.0)
    return _demo_ksampler(g, [p, 0], clip)


def _tiny_vision(g):
    return [g.add("GL_TinyCLIPVision", projection_dim=96, seed=0), 0]


@case("GL_Personalize", r"the hypernetwork 'cv_tiny' reads CLIP vision features \(17 tokens × 32 wide\)",
      r"connect the CLIP vision model it was trained with \(CLIPVisionLoader\) to the clip_vision input", "execution")
def personalize_clip_vision_hypernetwork_without_clip_vision(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    vision = {} if bad else {"clip_vision": _tiny_vision(g)}
    p = g.add("GL_Personalize", model=model, images=_subject(g), hypernetwork=_hypernet(g, "cv_tiny.safetensors"),
              strength=1.0, **vision)
    return _demo_ksampler(g, [p, 0], clip)


@case("GL_Personalize", r"trained on CLIP vision features of 17 tokens × 64 wide, but the connected CLIP vision "
      r"model gives 17 tokens × 32 wide", r"connect the CLIP vision model it was trained with \(ViT-L/14 gives "
      r"1024-wide", "execution")
def personalize_clip_vision_of_another_width(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    p = g.add("GL_Personalize", model=model, images=_subject(g), strength=1.0, clip_vision=_tiny_vision(g),
              hypernetwork=_hypernet(g, pick(bad, "cv_wide.safetensors", "cv_tiny.safetensors")))
    return _demo_ksampler(g, [p, 0], clip)


def _hypernet_train(g, **over):
    model, clip, vae = g.demo()
    inputs = dict(model=model, clip=clip, vae=vae, source="demo subjects", folder="", subjects=4, layers="attention",
                  rank=1, width=32, depth=1, steps=1, learning_rate=1e-3, subjects_per_step=1, ref_images=1,
                  target_images=1, resolution=8, output_reg=1e-4, encoder_pretrain_steps=0, freeze_encoder=False,
                  seed=0, checkpoint_every=0, filename_prefix="", save_to="output")
    inputs.update(over)
    g.add("GL_HypernetworkTrain", **inputs)
    return g.nodes


@case("GL_HypernetworkTrain", r"folder '/nonexistent/subjects' is not a directory", r"give a folder with one",
      "execution", fixed_runs=False)
def hypernet_train_missing_folder(bad):
    return _hypernet_train(Graph(), source=pick(bad, "folder", "demo subjects"), folder="/nonexistent/subjects")


@case("GL_HypernetworkTrain", r"filename_prefix \('\.\./\.\./hn'\)", r"relative name without '\.\.'", "validation",
      fixed_runs=False)
def hypernet_train_prefix_outside_folder(bad):
    return _hypernet_train(Graph(), filename_prefix=pick(bad, "../../hn", "bad_inputs/hn"))


@case("GL_HypernetworkTrain", r"encoder_pretrain_steps \(2\) pretrains the pack's own conv image encoder",
      r"set encoder_pretrain_steps to 0 \(or disconnect clip_vision", "execution")
def hypernet_train_pretraining_with_clip_vision(bad):
    g = Graph()
    return _hypernet_train(g, encoder_pretrain_steps=pick(bad, 2, 0), clip_vision=_tiny_vision(g))


@case("GL_HypernetworkTrain", r"resume 'cv_tiny' reads CLIP vision features \(17 tokens × 32 wide\)",
      r"connect the CLIP vision model it was trained with \(CLIPVisionLoader\) to the clip_vision input", "execution")
def hypernet_train_resume_clip_vision_without_clip_vision(bad):
    g = Graph()
    vision = {} if bad else {"clip_vision": _tiny_vision(g)}
    return _hypernet_train(g, resume=_hypernet(g, "cv_tiny.safetensors"), **vision)


def _hypernet_basis(g, **over):
    model, clip, vae = g.demo()
    inputs = dict(model=model, clip=clip, vae=vae, hypernetwork=_hypernet(g), source="demo subjects", folder="",
                  subjects=2, prototypes=1, rank=1, fit_steps=1, fit_learning_rate=5e-3, fit_parallel=1,
                  resolution=32, temperature=0.02, seed=0, filename_prefix="", save_to="output")
    inputs.update(over)
    g.add("GL_HypernetworkBasis", **inputs)
    return g.nodes


@case("GL_HypernetworkBasis", r"prototypes \(3\) must not exceed subjects \(2\)",
      r"the training subjects they are chosen from", "execution")
def hypernet_basis_more_prototypes_than_subjects(bad):
    return _hypernet_basis(Graph(), prototypes=pick(bad, 3, 1))


@case("GL_HypernetworkBasis", r"'cv_tiny' reads CLIP vision features", r"use source folder", "execution")
def hypernet_basis_demo_subjects_with_a_clip_vision_hypernetwork(bad):
    g = Graph()
    return _hypernet_basis(g, hypernetwork=_hypernet(g, pick(bad, "cv_tiny.safetensors", "demo_hypernet.safetensors")),
                           clip_vision=_tiny_vision(g))


@case("GL_HypernetworkBasis", r"trained for a UNet model .* this Flux model", r"use the base model the hypernetwork "
      r"was trained on", "execution")
def hypernet_basis_other_family(bad):
    g = Graph()
    return _hypernet_basis(g, **({"model": g.tiny("flux")[0]} if bad else {}))


@case("GL_DemoSubjectImages", r"split 'test'", r"choose one of 'train', 'heldout'", "validation")
def demo_subjects_unknown_split(bad):
    g = Graph()
    images = g.add("GL_DemoSubjectImages", subject=3, split=pick(bad, "test", "train"), count=2, start=0, size=16)
    return g.preview([images, 1])


# GL_AGDCollect, GL_AGDTrain, GL_AGDLoader, GL_AGDApply -----------------------------------------------------------
def _collect(g, model, clip, latent=None, **over):
    inputs = dict(model=model, clip=clip, latent=latent or g.latent(128), prompts="a red circle", negative="",
                  trajectories_per_prompt=1, omega_min=1.0, omega_max=8.0, steps=2, sampler_name="euler",
                  scheduler="normal", seed=0, precision="fp16", name="bad_inputs/agd")
    inputs.update(over)
    return g.add("GL_AGDCollect", **inputs)


@case("GL_AGDCollect", r"omega_min \(8\.0\) is above omega_max \(2\.0\)", r"swap them", "validation")
def agd_collect_omega_range(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    _collect(g, model, clip, omega_min=pick(bad, 8.0, 1.0), omega_max=pick(bad, 2.0, 8.0),
             name=pick(bad, "bad_inputs/agd_swapped", "bad_inputs/agd"))
    return g.nodes


@case("GL_AGDCollect", r"no prompts", r"give one prompt per line", "execution")
def agd_collect_empty_prompt_list(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    _collect(g, model, clip, prompts=pick(bad, " \n\n ", "a red circle"))
    return g.nodes


@case("GL_AGDCollect", r"latent .*\[1, 16, 1, 2, 2\]|latent .*5-D|latent .*video", r"EmptyLatentImage", "execution")
def agd_collect_video_latent(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    latent = ([g.add("EmptyHunyuanLatentVideo", width=16, height=16, length=1, batch_size=1), 0] if bad
              else g.latent(128))
    _collect(g, model, clip, latent=latent, name=pick(bad, "bad_inputs/agd_video", "bad_inputs/agd"))
    return g.nodes


def _agd_train(g, model=None, prefix="", objective="paper", precision="fp32"):
    demo, clip, _vae = g.demo()
    data = [_collect(g, demo, clip), 0]
    g.add("GL_AGDTrain", model=model or demo, data=data, hidden=4, fourier_features=2, use_prompt=True,
          time_token=True, steps=1, batch_size=2, learning_rate=1e-3, warmup=0.0, seed=0, checkpoint_every=0,
          filename_prefix=prefix, save_to="output", objective=objective, precision=precision)
    return g.nodes


@case("GL_AGDTrain", r"collected from another model", r"train on the model the trajectories came from", "execution")
def agd_train_data_of_another_model(bad):
    g = Graph()
    tiny, _pos, _neg = g.tiny()
    return _agd_train(g, model=tiny if bad else None)


@case("GL_AGDTrain", r"filename_prefix \('\.\./agd'\)", r"relative name without '\.\.'", "validation")
def agd_train_prefix_outside_folder(bad):
    return _agd_train(Graph(), prefix=pick(bad, "../agd", "bad_inputs/agd"))


@case("GL_AGDTrain", r"objective 'eps_l1' is not one of the options", r"choose one of 'paper', 'relative'",
      "validation")
def agd_train_unknown_objective(bad):
    return _agd_train(Graph(), objective=pick(bad, "eps_l1", "relative"))


@case("GL_AGDTrain", r"precision 'fp16' is not one of the options", r"choose one of 'fp32', 'bf16'", "validation")
def agd_train_unknown_precision(bad):
    return _agd_train(Graph(), precision=pick(bad, "fp16", "bf16"))


def _agd_apply(g, model, adapter="demo_agd.safetensors"):
    loader = [g.add("GL_AGDLoader", adapter=adapter), 0]
    return [g.add("GL_AGDApply", model=model, adapter=loader, guidance_scale=5.0, strength=1.0), 0]


@case("GL_AGDLoader", r"'nope\.safetensors' not found", r"put \.safetensors .* into models/gl_agd/", "validation")
def agd_loader_missing_file(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, _agd_apply(g, model, pick(bad, "nope.safetensors", "demo_agd.safetensors")), clip,
                          cfg=1.0)


@case("GL_AGDLoader", r"'wrong_kind\.safetensors' is not a Guidance Lab AGD adapter",
      r"pick a file written by GL_AGDTrain", "execution")
def agd_loader_wrong_kind_of_file(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    return _demo_ksampler(g, _agd_apply(g, model, pick(bad, "wrong_kind.safetensors", "demo_agd.safetensors")), clip,
                          cfg=1.0)


@case("GL_AGDApply", r"made for a UNet model .* this Flux model", r"use the base model the adapter was trained on",
      "execution")
def agd_apply_other_family(bad):
    g = Graph()
    demo, clip, _vae = g.demo()
    tiny, pos, neg = g.tiny("flux")
    applied = _agd_apply(g, pick(bad, tiny, demo))
    return g.ksampler(applied, pos, neg, cfg=1.0) if bad else _demo_ksampler(g, applied, clip, cfg=1.0)


@case("GL_AGDApply", r"made for a UNet model .* this UNet model .* differ", r"use the base model the adapter was "
      r"trained on", "execution")
def agd_apply_other_unet(bad):
    g = Graph()
    demo, clip, _vae = g.demo()
    tiny, pos, neg = g.tiny("sd15_v")
    applied = _agd_apply(g, pick(bad, tiny, demo))
    return g.ksampler(applied, pos, neg, cfg=1.0) if bad else _demo_ksampler(g, applied, clip, cfg=1.0)


# GL_TinyTestModel ----------------------------------------------------------------------------------------------
@case("GL_TinyTestModel", r"architecture 'sdxl'", r"choose one of 'sd15_eps'", "validation")
def tiny_model_unknown_architecture(bad):
    g = Graph()
    model, pos, neg = g.tiny(pick(bad, "sdxl", "sd15_v"))
    return g.ksampler(model, pos, neg)


# GL_TinyCLIPVision ---------------------------------------------------------------------------------------------
@case("GL_TinyCLIPVision", r"projection_dim", r"smaller than min of 8", "host")
def tiny_clip_vision_too_narrow(bad):
    g = Graph()
    model, clip, _vae = g.demo()
    vision = [g.add("GL_TinyCLIPVision", projection_dim=pick(bad, 4, 96), seed=0), 0]
    classifier = [g.add("GL_CLIPZeroShotClassifier", clip_vision=vision, clip=clip, labels="red circle, blue square",
                        prompt_template="a {label}", text_encoder="auto", logit_scale=100.0), 0]
    return _demo_ksampler(g, _cg(g, model, classifier), clip)


# GL_NFEReport --------------------------------------------------------------------------------------------------
@case("GL_NFEReport", r"this model does not count its evaluations", r"Put GL_NFECounter", "execution")
def nfe_report_model_without_counter(bad):
    g = Graph()
    model, pos, neg = g.tiny()
    counted = model if bad else [g.add("GL_NFECounter", model=model), 0]
    k = g.add("KSampler", model=counted, seed=next(_SEEDS), steps=2, cfg=5.0, sampler_name="euler",
              scheduler="normal", positive=pos, negative=neg, latent_image=g.latent(), denoise=1.0)
    g.add("GL_NFEReport", model=counted, samples=[k, 0])
    return g.nodes


# ------------------------------------------------------------------------------------------------ the tests

@pytest.mark.parametrize("c", CASES)
def test_bad_input_is_named_and_the_server_keeps_serving(c: Case, server):
    answer = server.run(c.build(True))
    assert not answer.ok, "the bad prompt ran"
    where = "validation" if c.stage == "host" else c.stage
    assert answer.stage == where, (answer.stage, answer.text)
    text = answer.text
    if c.stage == "host":           # the host's schema check: attached to our node, names the input
        assert c.node in answer.node_types, (answer.node_types, text)
    else:                           # our message names the node itself
        assert c.node in text, text
        if c.stage == "validation":
            assert answer.node_types == (c.node,), answer.node_types
    assert re.search(c.input, text), f"the message does not name the input ({c.input}): {text}"
    assert re.search(c.fix, text, re.IGNORECASE | re.DOTALL), f"the message gives no fix ({c.fix}): {text}"
    assert not RAW.search(text), f"raw error: {text}"
    assert answer.exception_type.rsplit(".", 1)[-1] not in RAW_TYPES, (answer.exception_type, text)
    follow = server.run(c.build(False) if c.fixed_runs else generic_good())
    assert follow.ok, f"the next prompt failed: {follow.stage}: {follow.text}"


def test_matrix_covers_every_node_with_inputs(host):
    import nodes
    pack = {name for name, cls in nodes.NODE_CLASS_MAPPINGS.items() if cls.__module__.startswith(host.module_name)}
    exempt = {"GL_NFECounter"}
    covered = {p.values[0].node for p in CASES}
    assert pack - exempt <= covered, sorted(pack - exempt - covered)


def test_server_state_is_clean_after_the_matrix(server):
    """After every failure above, the shared executor gives exactly what a fresh one gives."""
    prompt = generic_good()
    fresh = Server().run(prompt)
    again = server.run(prompt)
    assert fresh.ok and again.ok
    preview = next(k for k, v in prompt.items() if v["class_type"] == "PreviewAny")
    assert fresh.outputs[preview]["text"] == again.outputs[preview]["text"]
