"""Evaluation sampling over Ray actors: seeded chunks of class-balanced samples -> images + features.

API:
    labels = balanced_labels(n, num_classes)                    # sample i gets class i % C
    chunks = make_chunks(labels, chunk_size)                    # [(chunk index, labels), ...]
    pool = SamplerPool(settings, ar_uri, tok_uri, inception_cfg, num_actors=2, use_gpu=False)
    for chunk in pool.sample(chunks, cfg_scale=1.5, seed=0):     # in chunk order, as they finish
        chunk.images (uint8 B x R x R x 3), chunk.features (B x 2048), chunk.probs (B x C or None)
    feats = list(pool.map(image_batches))                       # reference images through the same actors
    pool.close()

Determinism: chunk j draws its randomness from torch.Generator(CPU) seeded with a hash of (seed, j) and
is computed by ONE actor with a fixed thread count (int(cpus_per_actor)), so the result depends on
(seed, n, chunk_size, cfg) and not on how many actors there are or which one ran which chunk; every
CFG scale of a sweep reuses the same seeds (common random numbers). On CPU two evaluations agree bit
for bit; GPU kernels are not bitwise reproducible in general. Each actor holds the AR model, the
tokenizer and the Inception network (one GPU each with use_gpu); the driver only receives uint8 images
and 2048-d features per chunk. An actor reserves cpus_per_actor CPUs in Ray, or fewer when the actors
would otherwise leave under READER_CPUS free for the reader tasks that stream the reference images
(e.g. 2 actors on a 2-core machine); its torch thread count stays int(cpus_per_actor) either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """Sample i -> class i % C: exactly n / C per class when C divides n (else within one)."""
    return np.arange(n, dtype=np.int64) % num_classes


def make_chunks(labels: np.ndarray, chunk_size: int) -> list[tuple[int, np.ndarray]]:
    return [(j, labels[lo:lo + chunk_size]) for j, lo in enumerate(range(0, len(labels), chunk_size))]


def chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(chunk), 0xE7A1]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Chunk:
    index: int  # chunk number j (samples j*chunk_size ...)
    labels: np.ndarray  # int64 B
    images: np.ndarray  # uint8 B x R x R x 3
    features: np.ndarray  # float64 B x 2048
    probs: np.ndarray | None  # float64 B x C class probabilities (configured classifier) or None


class SamplingWorker:
    """Body of the Ray actor (also usable in-process): AR + tokenizer + Inception (+ optional classifier)."""

    def __init__(self, settings, ar_uri: str, tok_uri: str, inception_cfg, classifier: tuple[str, str] | None,
                 device: str, threads: int):
        from detailflow.pipelines.evaluate import inception as inc
        from detailflow.pipelines.train.exports import load_ar, load_tokenizer
        from detailflow.platform.storage import Storage

        torch.set_num_threads(max(1, threads))
        storage = Storage(settings)
        self.device = torch.device(device)
        self.ar, _, _ = load_ar(storage, ar_uri, self.device)
        self.tok, _ = load_tokenizer(storage, tok_uri, device=self.device)
        self.inception = inc.InceptionFeatures(inception_cfg, storage)
        self.classifier = None
        if classifier is not None:
            weights, sha = classifier
            path = inc.resolve_weights(inc.InceptionConfig(weights=weights, sha256=sha), storage)
            self.classifier = torch.jit.load(str(path), map_location=self.device).eval()

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def sample(self, index: int, labels: np.ndarray, cfg_scale: float, seed: int, temperature: float,
               top_k: int, top_p: float) -> Chunk:
        from detailflow.models.generator import codes_to_uint8
        from detailflow.models.sampler import sample

        gen = torch.Generator(device="cpu").manual_seed(chunk_seed(seed, index))
        codes = sample(self.ar, torch.tensor(labels, device=self.device), cfg_scale=cfg_scale,
                       temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        imgs = codes_to_uint8(self.tok, codes)
        return Chunk(index, np.asarray(labels), imgs.permute(0, 2, 3, 1).cpu().numpy(), self.inception(imgs),
                     self._probs(imgs))

    @torch.no_grad()
    def _probs(self, imgs_u8: torch.Tensor) -> np.ndarray | None:
        if self.classifier is None:
            return None
        return torch.softmax(self.classifier(imgs_u8).double(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def features(self, images_u8_BCHW) -> np.ndarray:
        return self.inception(images_u8_BCHW)


READER_CPUS = 1.0  # CPUs left free for the reader feeding the reference images (ReadRange takes 1)


def reserve_cpus(num_actors: int, cpus_per_actor: float) -> float:
    """CPUs each actor reserves in Ray: cpus_per_actor, shrunk when the actors would otherwise take every
    CPU of the cluster (a 2-core machine with 2 actors) and starve the reader tasks (a deadlock)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    if total <= 0 or num_actors * cpus_per_actor <= total - READER_CPUS:
        return cpus_per_actor
    return max(0.01, min(cpus_per_actor, (total - READER_CPUS) / num_actors))


class SamplerPool:
    """num_actors SamplingWorker actors; ordered maps over chunks and over reference image batches."""

    def __init__(self, settings, ar_uri: str, tok_uri: str, inception_cfg, *, num_actors: int = 2,
                 use_gpu: bool = False, cpus_per_actor: float = 1.0,
                 classifier: tuple[str, str] | None = None):
        import dataclasses

        import ray
        from ray.util import ActorPool

        from detailflow.pipelines.data.ingest import ensure_ray

        ensure_ray(settings)
        device = "cuda" if use_gpu else "cpu"
        inception_cfg = dataclasses.replace(inception_cfg, device=device)
        n = max(1, num_actors)
        threads = max(1, int(cpus_per_actor))  # fixed by the config, never by the cluster: same digits
        actor_cls = ray.remote(num_cpus=reserve_cpus(n, cpus_per_actor), num_gpus=1 if use_gpu else 0)(
            SamplingWorker)
        self.actors = [actor_cls.remote(settings, ar_uri, tok_uri, inception_cfg, classifier, device, threads)
                       for _ in range(n)]
        ray.get([a.ready.remote() for a in self.actors])  # a loading error surfaces here, from the actor
        self.pool = ActorPool(self.actors)
        self.cfg = inception_cfg  # real_features() keys its cache on cfg.sha256

    def sample(self, chunks: Iterable[tuple[int, np.ndarray]], *, cfg_scale: float, seed: int,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Iterator[Chunk]:
        return self._ordered(lambda a, c: a.sample.remote(c[0], c[1], cfg_scale, seed, temperature, top_k,
                                                          top_p), chunks)

    def map(self, image_batches: Iterable) -> Iterator[np.ndarray]:
        """Inception features of each batch, in order (the extractor protocol of artifacts.real_features)."""
        return self._ordered(lambda a, imgs: a.features.remote(imgs), image_batches)

    def _ordered(self, fn, values: Iterable) -> Iterator:
        """Results in submission order, at most 2 tasks per actor outstanding (bounded driver memory)."""
        window, inflight = 2 * len(self.actors), 0
        for v in values:
            self.pool.submit(fn, v)
            inflight += 1
            if inflight >= window:
                yield self.pool.get_next()
                inflight -= 1
        while self.pool.has_next():
            yield self.pool.get_next()

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
