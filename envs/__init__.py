"""agentflow.envs"""
