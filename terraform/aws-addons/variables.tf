variable "name" {
  description = "Deployment name given to the aws root: the cluster, database, Redis and secret names derive from it."
  type        = string
  default     = "imagine"
}

variable "region" {
  description = "AWS region of the aws root."
  type        = string
  default     = "us-east-1"
}

variable "kuberay_chart_version" {
  description = "kuberay-operator chart (https://ray-project.github.io/kuberay-helm/); 1.6+ for the RayService's authOptions.secretName (cluster/base/rayservice.yaml)."
  type        = string
  default     = "1.6.2"
}

variable "nvidia_device_plugin_chart_version" {
  description = "nvidia-device-plugin chart (https://nvidia.github.io/k8s-device-plugin)."
  type        = string
  default     = "0.17.1"
}

variable "cluster_autoscaler_chart_version" {
  description = "cluster-autoscaler chart (https://kubernetes.github.io/autoscaler); 9.46.x ships cluster-autoscaler 1.32, matching EKS 1.32."
  type        = string
  default     = "9.46.6"
}

variable "kube_prometheus_stack_chart_version" {
  description = "kube-prometheus-stack chart (https://prometheus-community.github.io/helm-charts)."
  type        = string
  default     = "75.15.0"
}

variable "gpu_pools" {
  description = "Values of the imagine.dev/pool label that mark GPU nodes (the aws root's gpu_node_groups keys)."
  type        = list(string)
  default     = ["gpu-1", "gpu-4"]
}
