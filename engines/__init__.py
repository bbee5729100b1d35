"""agentflow.engines"""
