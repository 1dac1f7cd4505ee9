# Fake of InvokeAI 6.14.2 (checked against the PyPI release; read at invoke-ai/InvokeAI 8e71a8a519399d6db32054ae9afc7c6c4e2355af), only what lora-ext uses.
