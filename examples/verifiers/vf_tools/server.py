"""The ``multiply`` tool as an MCP server (verifiers starts it with ``python -m vf_tools.server``)."""

import verifiers.v1 as vf


class MultiplyToolset(vf.Toolset[vf.SharedToolsetConfig]):
    TOOL_PREFIX = None  # tools keep their own names

    @vf.tool
    def multiply(self, a: int, b: int) -> str:
        """Multiply two integers and return the product."""
        return str(a * b)


if __name__ == "__main__":
    MultiplyToolset.run()
