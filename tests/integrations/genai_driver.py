"""Runs in OpenVINO GenAI's environment (the tests call it with .venv-genai's Python): greedy
token ids of prompts with images through `openvino_genai.VLMPipeline`, one folder after
another. Reads a JSON spec from argv[1], prints one JSON line of results.

spec: {"runs": [{"name", "folder"}], "prompts": [{"prompt": str, "image": PNG path}],
       "max_new_tokens": n}
result: {name: [{"tokens": [ids], "input_tokens": n}, ...]}
The prompt goes in as written (no chat template), so a reference elsewhere can tokenize the
very text GenAI does.
"""
import json
import sys


def main() -> None:
    import numpy as np
    import openvino as ov
    import openvino_genai as og
    from PIL import Image

    class Ids(og.StreamerBase):
        def __init__(self):
            super().__init__()
            self.ids = []

        def write(self, token):
            self.ids += list(token) if isinstance(token, (list, tuple)) else [token]
            return og.StreamingStatus.RUNNING

        def end(self):
            pass

    spec = json.loads(open(sys.argv[1]).read())
    config = og.GenerationConfig()
    config.max_new_tokens, config.do_sample, config.apply_chat_template = spec.get("max_new_tokens", 8), False, False
    results = {}
    for run in spec["runs"]:
        pipe = og.VLMPipeline(run["folder"], "CPU")
        results[run["name"]] = []
        for p in spec["prompts"]:
            image = ov.Tensor(np.asarray(Image.open(p["image"]).convert("RGB"))[None].copy())
            ids = Ids()
            out = pipe.generate(p["prompt"], images=[image], generation_config=config, streamer=ids)
            results[run["name"]].append({"tokens": ids.ids, "input_tokens": out.perf_metrics.get_num_input_tokens()})
        del pipe
    print(json.dumps(results))


if __name__ == "__main__":
    main()
