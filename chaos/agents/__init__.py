"""The real coding agents, offline: a scripted model server (Anthropic Messages and OpenAI chat
completions, streaming) and throwaway homes in which Claude Code and OpenCode (installed by
``make agents`` into ``.agents/``) run under ``tether run`` against it. Used by tests/agents and
by ``tetherlab demo --agents real``; outside the product's import graph."""
