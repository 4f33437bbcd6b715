"""The official OpenAI and Ollama Python clients against cubegate, compared with the
simulator called directly. Run by tests/official_clients.rs:
    python3 official.py GATEWAY_ADDR DOMAIN VLLM_ADDR OLLAMA_ADDR VLLM_MODEL OLLAMA_MODEL
Exits non-zero (with the reason) on any difference."""
import sys

import ollama
from openai import NotFoundError, OpenAI

gw, domain, vllm, oll, vllm_model, ollama_model = sys.argv[1:7]


def openai_stream(base):
    client = OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=20)
    stream = client.chat.completions.create(
        model=vllm_model,
        messages=[{"role": "user", "content": "hello there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    return [chunk.model_dump_json() for chunk in stream]


via = openai_stream(f"http://{gw}/proxy/{domain}/v1")
direct = openai_stream(f"http://{vllm}/v1")
assert len(via) > 3, via
assert via == direct, (via, direct)

client = OpenAI(base_url=f"http://{gw}/proxy/{domain}/v1", api_key="unused", max_retries=0)
ids = sorted(m.id for m in client.models.list())
assert ids == sorted([vllm_model, ollama_model]), ids
full = client.chat.completions.create(model=ollama_model, messages=[{"role": "user", "content": "hi"}])
assert full.choices[0].message.content, full
emb = client.embeddings.create(model=vllm_model, input="abc")
assert len(emb.data[0].embedding) > 0
try:
    client.chat.completions.create(model="not-here", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("unknown model accepted")
except NotFoundError as e:
    assert "not-here" in str(e), e

def ollama_chat(host):
    c = ollama.Client(host=host, timeout=20)
    return [p.message.content for p in c.chat(model=ollama_model, messages=[{"role": "user", "content": "hi"}], stream=True)]

via = ollama_chat(f"http://{gw}/proxy/{domain}")
direct = ollama_chat(f"http://{oll}")
assert len(via) > 3 and via == direct, (via, direct)
c = ollama.Client(host=f"http://{gw}/proxy/{domain}")
assert [m.model for m in c.list().models] == [ollama_model]
gen = c.generate(model=ollama_model, prompt="why", options={"num_predict": 4})
assert gen.eval_count == 4, gen
print("official clients: ok")
