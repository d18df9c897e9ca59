"""Best-of-N (vdm.inference.rerank) and alignment guidance (vdm.inference.guidance,
samplers.steer_output) on the tiny random pipeline of tests/test_reproducibility.py with a
random "mu" alignment model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_reproducibility import A, B, tiny_pipeline
from vdm.diffusion import samplers, schedules
from vdm.errors import UserError
from vdm.inference import guidance, rerank
from vdm.inference.alignment import Aligner
from vdm.models import alignment as al


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def aligner(pipe):
    model = al.AlignmentModel(**al.VARIANTS["mu"])
    z = jnp.zeros((1, *pipe.latent_shape))
    ctx = jnp.zeros((1, pipe.text.max_length, pipe.text.dim))
    mask = jnp.ones((1, pipe.text.max_length), jnp.int32)
    params = model.init(jax.random.key(3), z, ctx, mask)["params"]
    return Aligner(model, jax.tree.map(np.asarray, params), pipe, "random")


def test_best_of_n_keeps_the_best_scored_candidate_whatever_the_batch(pipe, aligner):
    prompts, n, s = [A, B], 3, 2
    kept, scores = rerank.best_of_n(
        pipe, aligner, prompts, candidates=n, num_samples=s, seed=5, batch_size=8
    )
    assert kept.shape[0] == 4 and scores.shape == (4, 3)
    plain = pipe(prompts, seed=5, num_samples=n * s)  # sample j = c * s + i of each prompt
    for p in range(2):
        for i in range(s):
            row = scores[p * s + i]
            c = int(np.argmax(row))
            j = rerank.candidate_index(i, c, s)
            np.testing.assert_array_equal(kept[p * s + i], plain[p * n * s + j])
            # candidate 0 is the video sample.py makes without reranking
            own = aligner.score_videos(plain[p * n * s + i][None], [prompts[p]], batch_size=1)
            assert row[0] == pytest.approx(float(own[0]), abs=1e-6)
    kept1, scores1 = rerank.best_of_n(
        pipe, aligner, prompts, candidates=n, num_samples=s, seed=5, batch_size=1
    )
    np.testing.assert_array_equal(kept1, kept)
    np.testing.assert_array_equal(scores1, scores)
    # the candidates of N = 2 are the first two of N = 3
    _, scores2 = rerank.best_of_n(pipe, aligner, prompts, candidates=2, num_samples=s, seed=5)
    np.testing.assert_array_equal(scores2, scores[:, :2])
    assert list(rerank.choose(scores, 2)) == list(np.argmax(scores[:, :2], axis=1))


def test_chosen_records_name_every_candidate_score():
    c = rerank.Chosen(0, np.zeros((1, 1)), np.array([[0.1, 0.5, 0.2]]), np.array([1]))
    (r,) = c.records()
    assert r["candidates"] == 3 and r["candidate"] == 1
    assert r["alignment_score"] == pytest.approx(0.5)
    assert r["candidate_scores"] == pytest.approx([0.1, 0.5, 0.2])


@pytest.mark.parametrize("objective", ["flow", "eps", "v"])
def test_steer_output_predicts_the_steered_x0(objective):
    spec = schedules.DiffusionSpec.from_config({"objective": objective})
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    out = jax.random.normal(jax.random.key(1), (2, 3, 4))
    t = jnp.array([0.3, 0.7])

    def guide(x0, t):
        return x0 + 0.5

    steered = samplers.steer_output(out, x, t, spec, guide)
    x0 = schedules.predictions(out, x, t, spec)[0]
    np.testing.assert_allclose(schedules.predictions(steered, x, t, spec)[0], x0 + 0.5, atol=1e-4)


def test_guidance_raises_the_alignment_score_of_the_sampled_latents(pipe, aligner):
    ids, mask = pipe.text.tokenize([A, B])
    ctx = pipe.text.encode(pipe.text.params, ids, mask)
    score = aligner.latent_score_fn()
    noise = jax.random.normal(jax.random.key(0), (2, *pipe.latent_shape))

    def model_fn(x, t, cond):
        return jnp.zeros_like(x)  # a "model" with no opinion: guidance alone moves x0

    guided_pipe = guidance.GuidedPipeline(
        **{k: getattr(pipe, k) for k in ("config", "text", "vae", "vae_params", "latent_stats")},
        model=pipe.model,
        params=pipe.params,
        devices=jax.devices()[:1],
        aligner=aligner,
        alignment_scale=0.3,
    )
    kw = dict(sampler="euler", num_steps=4, guidance=1.0, diffusion_config={"objective": "flow"})
    plain = samplers.sample(model_fn, noise, (ctx, mask), None, **kw)
    steered = samplers.sample(
        model_fn, noise, (ctx, mask), None, x0_guide=guided_pipe.x0_guide(ctx, mask), **kw
    )
    before = score(aligner.params, plain, ctx, jnp.asarray(mask))
    after = score(aligner.params, steered, ctx, jnp.asarray(mask))
    assert np.all(np.asarray(after) > np.asarray(before) + 0.05)
    assert guidance.guided(pipe, aligner, 0.0) is pipe
    with pytest.raises(UserError, match="alignment_guidance"):
        guidance.guided(pipe, aligner, -1.0)
    videos = guided_pipe([A], seed=0)  # the whole program traces with the guide inside
    assert videos.shape[0] == 1 and videos.dtype == np.uint8


def test_bad_candidates_captions_and_guidance_are_named_before_loading(tmp_path):
    from vdm.eval import runner
    from vdm.inference import writer

    out = str(tmp_path / "out")
    with pytest.raises(UserError, match="--candidates"):
        writer.run(["a 3 moving up"], candidates=0, output_dir=out)
    with pytest.raises(UserError, match="--formats latent"):
        writer.run(["a 3 moving up"], candidates=2, formats=["mp4", "latent"], output_dir=out)
    with pytest.raises(UserError, match="--candidates"):
        runner.run(candidates=0, output_dir=out)
    with pytest.raises(UserError, match="--captions"):
        runner.run(captions=["caption_nope"], output_dir=out)
    assert not (tmp_path / "out").exists()
