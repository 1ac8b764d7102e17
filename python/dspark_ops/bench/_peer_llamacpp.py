"""llama.cpp (the llama-cpp-python package) as a peer of `dspark bench peers`: run by the peer's own
interpreter, so it imports nothing from dspark_ops. Reads a JSON job on stdin, writes the result to the file
the job names.

Job: {"gguf": path, "prompts": [[ids]], "max_new_tokens": n, "stop": [ids], "threads": T, "result": path}
Result: {"outputs": [[ids]], "seconds": generation wall time (prefill included), "version": ...}
llama-cpp-python decodes one sequence at a time: batch 1 only.
"""
import json
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    import llama_cpp

    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=2048, n_batch=512, n_threads=job["threads"],
                          n_threads_batch=job["threads"], verbose=False, seed=0)
    stop = set(job["stop"])

    def generate(prompt, n):
        out = []
        # temp 0: llama.cpp's greedy sampler (argmax); no repetition penalty.
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if token in stop or len(out) >= n:
                break
        return out

    generate(job["prompts"][0], 4)   # warm-up
    t0 = time.perf_counter()
    outputs = [generate(p, job["max_new_tokens"]) for p in job["prompts"]]
    seconds = time.perf_counter() - t0
    with open(job["result"], "w") as f:
        json.dump({"outputs": outputs, "seconds": seconds, "version": llama_cpp.__version__}, f)


if __name__ == "__main__":
    main()
