"""Our vision-language GGUF pairs (text GGUF + mmproj) run by llama.cpp's mtmd (opt-in: `pytest -m
llamacpp`; needs llama-cpp-python and its libmtmd, e.g. built from llama.cpp's tools/mtmd and
named by MTMD_CPP_LIB / LLAMA_CPP_LIB_PATH): for Gemma 3, Qwen2.5-VL, Idefics3 and SmolVLM the
image embeddings llama.cpp computes from the mmproj equal the merged model's
`get_image_features` on the same image, token count and values.

Measured (llama.cpp of llama-cpp-python 0.3.36, f32 files): max gap 3e-4 to 7e-4 of the
embeddings' scale, random or constant images alike (ggml's GELU goes through an fp16 table)."""

import ctypes

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")
try:
    from llama_cpp import mtmd_cpp
except (OSError, RuntimeError, FileNotFoundError) as err:  # the wheel may ship no libmtmd
    pytest.skip(f"llama-cpp-python has no libmtmd ({err}); set MTMD_CPP_LIB",
                allow_module_level=True)

import vision_models  # noqa: E402

from loratune.cli import main  # noqa: E402
from loratune.models.vision import load_vision_model  # noqa: E402

# family -> image side: the tiny towers' own size; Qwen2.5-VL 112 (16 merged tokens: llama.cpp
# hard-codes at least 8 for it, where the tiny processor would shrink the image to 4)
SIDES = {"gemma3": 32, "qwen2_5_vl": 112, "idefics3": 32, "smolvlm": 32}
TOL = 1e-2  # of the embeddings' largest magnitude


def image(side: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def llamacpp_embeddings(text_gguf, mmproj, img) -> torch.Tensor:
    """The embeddings mtmd gives the image chunks of one prompt holding the image."""
    model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(),
                                                 llama_cpp.llama_model_default_params())
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 2, False
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), model, params)
    assert ctx, f"llama.cpp could not load {mmproj}"
    try:
        raw = np.asarray(img.convert("RGB"), dtype=np.uint8).tobytes()
        bitmap = mtmd_cpp.mtmd_bitmap_init(img.width, img.height,
                                           (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw))
        prompt = b"look " + mtmd_cpp.mtmd_default_marker() + b" here"
        text = mtmd_cpp.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = (
            prompt, len(prompt), False, True)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text),
                                      (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        width = llama_cpp.llama_model_n_embd(model)
        out = []
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == 0:  # text
                continue
            n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            assert mtmd_cpp.mtmd_encode_chunk(ctx, chunk) == 0
            ptr = mtmd_cpp.mtmd_get_output_embd(ctx)
            out.append(torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n * width,)).copy())
                       .view(n, width))
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        return torch.cat(out)
    finally:
        mtmd_cpp.mtmd_free(ctx)
        llama_cpp.llama_model_free(model)


def transformers_embeddings(model, image_processor, name, img) -> torch.Tensor:
    kw = {"size": {"shortest_edge": 28 * 28, "longest_edge": img.width * img.height}} \
        if name == "qwen2_5_vl" else {}
    px = image_processor(images=[img], return_tensors="pt", **kw)
    rest = {k: v for k, v in px.items() if k != "pixel_values"}
    with torch.no_grad():
        feats = model.model.get_image_features(px["pixel_values"], **rest)
    feats = getattr(feats, "pooler_output", feats)
    if isinstance(feats, (list, tuple)):
        return torch.cat(list(feats))
    return feats.reshape(-1, feats.shape[-1])


@pytest.mark.parametrize("name", sorted(SIDES))
def test_llamacpp_computes_the_image_embeddings_of_our_mmproj(name, tmp_path):
    folder = getattr(vision_models, f"tiny_{name}")(tmp_path / name)
    out = tmp_path / f"{name}.gguf"
    assert main(["export", "gguf", "--model", str(folder), "--out", str(out), "--type", "f32",
                 "--no-modelfile"]) == 0
    model, _, image_processor = load_vision_model(folder)
    one, two = image(SIDES[name], 0), image(SIDES[name], 1)
    got = llamacpp_embeddings(out, tmp_path / f"mmproj-{name}.gguf", one)
    want = transformers_embeddings(model.eval(), image_processor, name, one)
    assert got.shape == want.shape
    tol = TOL * want.abs().max().item()
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    other = transformers_embeddings(model, image_processor, name, two)
    assert (other - want).abs().max() > 10 * tol  # another image moves them past the tolerance
