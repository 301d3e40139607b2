"""Agents: the Responses and Conversations APIs (OpenAI's shapes, as Llama Stack 0.7 serves them).

    models.py      request models (Pydantic; unknown fields are 400s)
    items.py       input items <-> stored items <-> chat messages; ids
    loop.py        the agent loop: one response, as OpenAI's stream of events
    tools/         what the model may call: client functions, code interpreter (sandbox.py), web search,
                   MCP, file search
    guardrails.py  the hook where shields check a response's input and output
    store.py       SQLite: responses, conversations, items
    service.py     `Agents`: what the routes (corral/stack/routes_agents.py) call
"""
