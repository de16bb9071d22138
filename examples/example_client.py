"""Talk to a running fleetserve gateway with the official openai client.

Start the fleet first (./run.sh up), then: .venv/bin/python examples/example_client.py [URL]
"""

import os
import sys

from openai import OpenAI

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
# The key matters only when the gateway was started with --api-key.
client = OpenAI(base_url=url + "/v1", api_key=os.environ.get("FLEETSERVE_API_KEY", "unused"))
model = client.models.list().data[0].id

reply = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Name three rivers."}], max_tokens=48, temperature=0
)
print(reply.choices[0].message.content)
print(reply.usage)

print("\nstreamed:")
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a haiku about the sea."}],
    max_tokens=48,
    temperature=0.7,
    seed=1,
    stream=True,
):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
