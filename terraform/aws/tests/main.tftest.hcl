# What the AWS root builds, checked against a mocked provider (no account, no network): `terraform test`.

mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  name   = "imagine"
  region = "us-east-1"
}

run "gpu_pools_scale_from_zero_tainted_and_labelled" {
  command = apply

  assert {
    condition     = alltrue([for p in ["gpu-1", "gpu-4"] : aws_eks_node_group.this[p].scaling_config[0].min_size == 0 && aws_eks_node_group.this[p].scaling_config[0].desired_size == 0])
    error_message = "GPU node groups must start at and scale down to zero nodes."
  }
  assert {
    condition     = aws_eks_node_group.this["gpu-1"].scaling_config[0].max_size >= 1 && aws_eks_node_group.this["gpu-4"].scaling_config[0].max_size >= 1
    error_message = "GPU node groups must be able to scale up."
  }
  assert {
    condition = alltrue([for p in ["gpu-1", "gpu-4"] :
      aws_eks_node_group.this[p].taint == toset([{ key = "nvidia.com/gpu", value = "present", effect = "NO_SCHEDULE" }])
    ])
    error_message = "GPU nodes must carry exactly the taint nvidia.com/gpu=present:NoSchedule."
  }
  assert {
    condition     = alltrue([for p in ["cpu", "gpu-1", "gpu-4"] : aws_eks_node_group.this[p].labels == tomap({ "imagine.dev/pool" = p })])
    error_message = "Each node group must be labelled imagine.dev/pool=<its pool>."
  }
  assert {
    condition     = length(aws_eks_node_group.this["cpu"].taint) == 0 && aws_eks_node_group.this["cpu"].scaling_config[0].min_size >= 1
    error_message = "The CPU system pool must be untainted and never empty."
  }
  assert {
    condition     = aws_eks_node_group.this["gpu-1"].ami_type == "AL2023_x86_64_NVIDIA" && aws_eks_node_group.this["gpu-4"].ami_type == "AL2023_x86_64_NVIDIA"
    error_message = "GPU node groups must run the NVIDIA accelerated AMI."
  }
  assert {
    condition     = length(aws_eks_node_group.this) == 3
    error_message = "Expected exactly the cpu, gpu-1 and gpu-4 node groups."
  }
}

run "cluster_autoscaler_can_build_templates_for_empty_gpu_groups" {
  command = plan # the first run applied: every value is known from state

  assert {
    condition     = aws_autoscaling_group_tag.scale_from_zero["gpu-4/gpus"].tag[0].key == "k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu" && aws_autoscaling_group_tag.scale_from_zero["gpu-4/gpus"].tag[0].value == "4"
    error_message = "gpu-4's ASG must advertise 4 GPUs per node to the cluster-autoscaler."
  }
  assert {
    condition     = aws_autoscaling_group_tag.scale_from_zero["gpu-1/gpus"].tag[0].value == "1"
    error_message = "gpu-1's ASG must advertise 1 GPU per node."
  }
  assert {
    condition     = aws_autoscaling_group_tag.scale_from_zero["gpu-1/label"].tag[0].key == "k8s.io/cluster-autoscaler/node-template/label/imagine.dev/pool" && aws_autoscaling_group_tag.scale_from_zero["gpu-1/label"].tag[0].value == "gpu-1"
    error_message = "gpu-1's ASG must advertise its pool label."
  }
  assert {
    condition     = aws_autoscaling_group_tag.scale_from_zero["gpu-4/taint"].tag[0].key == "k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu" && aws_autoscaling_group_tag.scale_from_zero["gpu-4/taint"].tag[0].value == "present:NoSchedule"
    error_message = "gpu-4's ASG must advertise the GPU taint."
  }
  assert {
    condition     = length(aws_autoscaling_group_tag.scale_from_zero) == 6 && alltrue([for t in aws_autoscaling_group_tag.scale_from_zero : !t.tag[0].propagate_at_launch])
    error_message = "Three template tags per GPU group (label, taint, GPU count), not propagated to instances."
  }
  assert {
    condition     = aws_eks_pod_identity_association.cluster_autoscaler.namespace == "kube-system" && aws_eks_pod_identity_association.cluster_autoscaler.service_account == "cluster-autoscaler"
    error_message = "The cluster-autoscaler's role must be bound to kube-system/cluster-autoscaler."
  }
}

run "nodes_and_control_plane_are_locked_down" {
  command = plan # the first run applied: every value is known from state

  assert {
    condition     = alltrue([for lt in aws_launch_template.node : lt.metadata_options[0].http_tokens == "required" && lt.metadata_options[0].http_put_response_hop_limit == 1])
    error_message = "Nodes must require IMDSv2 with a hop limit of 1 (pods cannot borrow the node role)."
  }
  assert {
    condition     = alltrue([for lt in aws_launch_template.node : lt.block_device_mappings[0].ebs[0].encrypted == "true"])
    error_message = "Node root volumes must be encrypted."
  }
  assert {
    condition     = alltrue([for lt in aws_launch_template.node : contains(lt.vpc_security_group_ids, aws_security_group.node.id)])
    error_message = "Every node must carry the node security group (the source RDS and Redis accept)."
  }
  assert {
    condition     = !aws_eks_cluster.this.vpc_config[0].endpoint_public_access && aws_eks_cluster.this.vpc_config[0].endpoint_private_access
    error_message = "The API endpoint must be private by default."
  }
  assert {
    condition     = one(aws_eks_cluster.this.encryption_config).resources == toset(["secrets"]) && one(one(aws_eks_cluster.this.encryption_config).provider).key_arn == aws_kms_key.this.arn
    error_message = "Kubernetes Secrets must be envelope-encrypted with the deployment key."
  }
  assert {
    condition     = length(aws_eks_cluster.this.enabled_cluster_log_types) == 5
    error_message = "All five control-plane log types must be enabled."
  }
  assert {
    condition     = alltrue([for s in aws_subnet.private : !s.map_public_ip_on_launch]) && length(aws_subnet.private) == 3
    error_message = "Three private subnets, none handing out public IPs."
  }
  assert {
    condition     = toset(aws_eks_node_group.this["gpu-1"].subnet_ids) == toset([for s in aws_subnet.private : s.id])
    error_message = "GPU nodes must live in the private subnets."
  }
}

run "artifact_bucket_private_encrypted_tls_only_with_retention" {
  command = plan # the first run applied: every value is known from state

  assert {
    condition = (
      aws_s3_bucket_public_access_block.artifacts.block_public_acls &&
      aws_s3_bucket_public_access_block.artifacts.block_public_policy &&
      aws_s3_bucket_public_access_block.artifacts.ignore_public_acls &&
      aws_s3_bucket_public_access_block.artifacts.restrict_public_buckets
    )
    error_message = "All four public access blocks must be on."
  }
  assert {
    condition = (
      one(one(aws_s3_bucket_server_side_encryption_configuration.artifacts.rule).apply_server_side_encryption_by_default).sse_algorithm == "aws:kms" &&
      one(one(aws_s3_bucket_server_side_encryption_configuration.artifacts.rule).apply_server_side_encryption_by_default).kms_master_key_id == aws_kms_key.this.arn &&
      one(aws_s3_bucket_server_side_encryption_configuration.artifacts.rule).bucket_key_enabled
    )
    error_message = "Default encryption must be SSE-KMS with the deployment key and a bucket key."
  }
  assert {
    condition = anytrue([for s in jsondecode(aws_s3_bucket_policy.artifacts.policy).Statement :
      s.Effect == "Deny" && s.Principal == "*" && s.Action == "s3:*" && try(s.Condition.Bool["aws:SecureTransport"], null) == "false" &&
      toset(s.Resource) == toset([aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"])
    ])
    error_message = "The bucket policy must deny every non-TLS request to the bucket and its objects."
  }
  assert {
    condition     = aws_s3_bucket_versioning.artifacts.versioning_configuration[0].status == "Disabled"
    error_message = "Versioning stays off (deletes must delete; see storage.tf)."
  }
  assert {
    condition     = { for r in aws_s3_bucket_lifecycle_configuration.artifacts.rule : r.filter[0].prefix => r.expiration[0].days if length(r.expiration) > 0 } == { "imagine/outputs/" = 30, "imagine/inputs/" = 30, "imagine/checkpoints/" = 30, "imagine/work/" = 30 }
    error_message = "Outputs expire after output_retention_days; inputs, checkpoints and work files sooner, each under the store's prefix."
  }
  assert {
    condition = anytrue([for r in aws_s3_bucket_lifecycle_configuration.artifacts.rule :
      r.status == "Enabled" && length(r.expiration) == 0 && r.filter[0].prefix == "" &&
      r.abort_incomplete_multipart_upload[0].days_after_initiation == 1
    ])
    error_message = "A bucket-wide rule must abort incomplete multipart uploads."
  }
  assert {
    condition     = output.artifacts_uri == "s3://${aws_s3_bucket.artifacts.bucket}/imagine"
    error_message = "artifacts_uri must be the app's s3://bucket/prefix setting."
  }
}

run "job_store_private_encrypted_reachable_from_nodes_only" {
  command = plan # the first run applied: every value is known from state

  assert {
    condition     = !aws_db_instance.jobs.publicly_accessible && aws_db_instance.jobs.storage_encrypted && aws_db_instance.jobs.kms_key_id == aws_kms_key.this.arn
    error_message = "The job store must be private and encrypted with the deployment key."
  }
  assert {
    condition     = aws_db_instance.jobs.manage_master_user_password && aws_db_instance.jobs.password == null
    error_message = "The master password must be RDS-managed (Secrets Manager), never set in configuration."
  }
  assert {
    condition     = aws_db_instance.jobs.engine == "postgres" && aws_db_instance.jobs.multi_az && aws_db_instance.jobs.deletion_protection
    error_message = "PostgreSQL, multi-AZ and deletion-protected by default."
  }
  assert {
    condition     = toset(aws_db_instance.jobs.vpc_security_group_ids) == toset([aws_security_group.database.id]) && toset(aws_db_subnet_group.jobs.subnet_ids) == toset([for s in aws_subnet.private : s.id])
    error_message = "The job store sits in the private subnets behind its own security group."
  }
  assert {
    condition = (
      aws_vpc_security_group_ingress_rule.database_from_nodes.security_group_id == aws_security_group.database.id &&
      aws_vpc_security_group_ingress_rule.database_from_nodes.referenced_security_group_id == aws_security_group.node.id &&
      aws_vpc_security_group_ingress_rule.database_from_nodes.cidr_ipv4 == null &&
      aws_vpc_security_group_ingress_rule.database_from_nodes.from_port == 5432
    )
    error_message = "The job store accepts 5432 from the node security group only (no CIDR)."
  }
  assert {
    condition     = anytrue([for p in aws_db_parameter_group.jobs.parameter : p.name == "rds.force_ssl" && p.value == "1"])
    error_message = "The job store must refuse non-TLS connections."
  }
}

run "ray_gcs_redis_fails_over_with_tls_and_auth" {
  command = plan # the first run applied: every value is known from state

  assert {
    condition = (
      aws_elasticache_replication_group.gcs.automatic_failover_enabled &&
      aws_elasticache_replication_group.gcs.multi_az_enabled &&
      aws_elasticache_replication_group.gcs.num_cache_clusters >= 2
    )
    error_message = "The GCS Redis must fail over automatically to a replica in another AZ."
  }
  assert {
    condition = (
      aws_elasticache_replication_group.gcs.transit_encryption_enabled &&
      aws_elasticache_replication_group.gcs.transit_encryption_mode == "required" &&
      aws_elasticache_replication_group.gcs.at_rest_encryption_enabled == "true"
    )
    error_message = "The GCS Redis must require TLS and be encrypted at rest."
  }
  assert {
    condition     = aws_elasticache_replication_group.gcs.auth_token == aws_secretsmanager_secret_version.redis_auth.secret_string && length(aws_elasticache_replication_group.gcs.auth_token) >= 16
    error_message = "The GCS Redis must require the AUTH token kept in Secrets Manager."
  }
  assert {
    condition     = anytrue([for p in aws_elasticache_parameter_group.gcs.parameter : p.name == "maxmemory-policy" && p.value == "noeviction"])
    error_message = "Ray's GCS keys must never be evicted."
  }
  assert {
    condition     = aws_vpc_security_group_ingress_rule.redis_from_nodes.referenced_security_group_id == aws_security_group.node.id && aws_vpc_security_group_ingress_rule.redis_from_nodes.cidr_ipv4 == null
    error_message = "The GCS Redis accepts the node security group only."
  }
  assert {
    condition     = output.redis_address == "rediss://master.imagine-gcs.mock.use1.cache.amazonaws.com:6379"
    error_message = "redis_address must be the TLS URL of the primary endpoint."
  }
}

run "pod_identity_policy_names_only_the_bucket_and_its_key" {
  command = plan # the first run applied: every value is known from state

  assert {
    condition = (
      aws_eks_pod_identity_association.app.namespace == "imagine" &&
      aws_eks_pod_identity_association.app.service_account == "imagine" &&
      aws_eks_pod_identity_association.app.role_arn == aws_iam_role.app.arn
    )
    error_message = "The app role must be bound to imagine/imagine."
  }
  assert {
    condition     = one(jsondecode(aws_iam_role.app.assume_role_policy).Statement).Principal.Service == "pods.eks.amazonaws.com"
    error_message = "Only EKS Pod Identity may assume the app role."
  }
  assert {
    condition = alltrue([for s in jsondecode(aws_iam_policy.app_artifacts.policy).Statement :
      s.Effect == "Allow" && (
        s.Resource == aws_s3_bucket.artifacts.arn ||
        s.Resource == "${aws_s3_bucket.artifacts.arn}/imagine/*" ||
        s.Resource == "${aws_s3_bucket.artifacts.arn}/models/*" ||
        s.Resource == aws_kms_key.this.arn
      )
    ])
    error_message = "Every statement of the app policy must name the artifact bucket (or a prefix of it) or its KMS key, nothing else."
  }
  assert {
    condition = length(setsubtract(
      toset(flatten([for s in jsondecode(aws_iam_policy.app_artifacts.policy).Statement : s.Action])),
      toset([
        "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket", "s3:ListBucketMultipartUploads",
        "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts", "kms:GenerateDataKey", "kms:Decrypt",
      ])
    )) == 0
    error_message = "The app policy may grant object read/write/delete, listing and multipart actions only."
  }
  assert {
    condition = alltrue([for s in jsondecode(aws_iam_policy.app_artifacts.policy).Statement :
      s.Resource != aws_kms_key.this.arn || try(s.Condition.StringEquals["kms:ViaService"], null) == "s3.us-east-1.amazonaws.com"
    ])
    error_message = "The key may be used through S3 only."
  }
  assert {
    condition     = [for s in jsondecode(aws_iam_policy.app_artifacts.policy).Statement : s.Resource if s.Sid == "ReadModelWeights"] == ["${aws_s3_bucket.artifacts.arn}/models/*"] && [for s in jsondecode(aws_iam_policy.app_artifacts.policy).Statement : s.Action if s.Sid == "ReadModelWeights"] == [["s3:GetObject"]]
    error_message = "Model weights are read-only."
  }
}

run "outputs_for_cluster_files" {
  command = plan # the first run applied: every value is known from state

  assert {
    condition     = output.namespace == "imagine" && output.service_account == "imagine" && output.node_pool_label_key == "imagine.dev/pool"
    error_message = "cluster/ expects namespace imagine, service account imagine and the imagine.dev/pool label."
  }
  assert {
    condition     = output.node_pools["gpu-4"].gpus_per_node == 4 && output.node_pools["gpu-1"].gpus_per_node == 1 && length(output.node_pools["cpu"].taints) == 0
    error_message = "node_pools must describe each pool."
  }
  assert {
    condition     = output.gpu_taint == "nvidia.com/gpu=present:NoSchedule" && output.node_pools["gpu-4"].taints == tolist(["nvidia.com/gpu=present:NoSchedule"])
    error_message = "The GPU taint output must match the node groups' taint."
  }
  assert {
    condition     = output.database_url_env.env == "IMAGINE_DATABASE_URL" && output.database_master_secret_arn == aws_db_instance.jobs.master_user_secret[0].secret_arn
    error_message = "The job store's URL reaches pods as IMAGINE_DATABASE_URL, built from the RDS-managed secret."
  }
}

run "bucket_root_store_without_weights_prefix" {
  command = apply

  variables {
    artifact_prefix = ""
    weights_prefix  = null
  }

  assert {
    condition     = toset([for r in aws_s3_bucket_lifecycle_configuration.artifacts.rule : r.filter[0].prefix if length(r.expiration) > 0]) == toset(["outputs/", "inputs/", "checkpoints/", "work/"])
    error_message = "With an empty prefix the rules filter on the key families at the bucket root."
  }
  assert {
    condition     = [for s in jsondecode(aws_iam_policy.app_artifacts.policy).Statement : s.Resource if s.Sid == "ReadWriteArtifacts"] == ["${aws_s3_bucket.artifacts.arn}/*"] && length([for s in jsondecode(aws_iam_policy.app_artifacts.policy).Statement : s if s.Sid == "ReadModelWeights"]) == 0
    error_message = "With an empty prefix pods get the bucket's objects and no separate weights statement."
  }
  assert {
    condition     = output.artifacts_uri == "s3://${aws_s3_bucket.artifacts.bucket}" && output.weights_uri == null
    error_message = "artifacts_uri has no trailing slash at the bucket root."
  }
}

run "other_gpu_shapes_and_public_endpoint" {
  command = apply

  variables {
    gpu_node_groups = {
      "gpu-8" = { instance_types = ["p5.48xlarge"], gpus_per_node = 8, max_size = 1, capacity_type = "SPOT" }
    }
    gpu_ami_type                         = "AL2_x86_64_GPU"
    cluster_endpoint_public_access       = true
    cluster_endpoint_public_access_cidrs = ["203.0.113.0/24"]
    single_nat_gateway                   = false
    availability_zones                   = ["us-east-1a", "us-east-1b"]
  }

  assert {
    condition     = keys(aws_eks_node_group.this) == ["cpu", "gpu-8"] && aws_eks_node_group.this["gpu-8"].scaling_config[0].min_size == 0 && aws_eks_node_group.this["gpu-8"].capacity_type == "SPOT"
    error_message = "The GPU groups follow gpu_node_groups, still from zero."
  }
  assert {
    condition     = aws_autoscaling_group_tag.scale_from_zero["gpu-8/gpus"].tag[0].value == "8" && aws_eks_node_group.this["gpu-8"].ami_type == "AL2_x86_64_GPU"
    error_message = "gpu-8 advertises 8 GPUs and runs the requested AMI."
  }
  assert {
    condition     = aws_eks_cluster.this.vpc_config[0].endpoint_public_access && aws_eks_cluster.this.vpc_config[0].public_access_cidrs == toset(["203.0.113.0/24"])
    error_message = "A public endpoint is limited to the given CIDRs."
  }
  assert {
    condition     = length(aws_nat_gateway.this) == 2 && length(aws_subnet.private) == 2
    error_message = "One NAT gateway per AZ when single_nat_gateway is false."
  }
}
