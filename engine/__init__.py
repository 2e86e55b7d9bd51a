"""dreambot engine: the GPU worker that trains DreamBooth subjects and generates images."""
