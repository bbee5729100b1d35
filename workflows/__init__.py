"""agentflow.workflows"""
