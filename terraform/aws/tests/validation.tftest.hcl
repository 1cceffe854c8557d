# Inputs the AWS root refuses, each with the variable whose validation must fail (plan only, mocked provider).

mock_provider "aws" {
  source = "./tests/mocks"
}

run "defaults_are_valid" {
  command = plan
}

run "zero_output_retention" {
  command = plan
  variables {
    output_retention_days = 0
  }
  expect_failures = [var.output_retention_days]
}

run "fractional_output_retention" {
  command = plan
  variables {
    output_retention_days = 10.5
  }
  expect_failures = [var.output_retention_days]
}

run "inputs_outliving_outputs" {
  command = plan
  variables {
    output_retention_days = 14
    input_retention_days  = 30
  }
  expect_failures = [var.input_retention_days]
}

run "checkpoints_outliving_inputs" {
  command = plan
  variables {
    input_retention_days      = 10
    checkpoint_retention_days = 20
  }
  expect_failures = [var.checkpoint_retention_days]
}

run "public_endpoint_without_cidrs" {
  command = plan
  variables {
    cluster_endpoint_public_access = true
  }
  expect_failures = [var.cluster_endpoint_public_access_cidrs]
}

run "public_endpoint_open_to_the_world" {
  command = plan
  variables {
    cluster_endpoint_public_access       = true
    cluster_endpoint_public_access_cidrs = ["0.0.0.0/0"]
  }
  expect_failures = [var.cluster_endpoint_public_access_cidrs]
}

run "gpu_pool_name_disagrees_with_its_gpu_count" {
  command = plan
  variables {
    gpu_node_groups = {
      "gpu-2" = { instance_types = ["g6e.12xlarge"], gpus_per_node = 4, max_size = 1 }
    }
  }
  expect_failures = [var.gpu_node_groups]
}

run "cpu_ami_for_gpu_nodes" {
  command = plan
  variables {
    gpu_ami_type = "AL2023_x86_64_STANDARD"
  }
  expect_failures = [var.gpu_ami_type]
}

run "system_pool_scaling_to_zero" {
  command = plan
  variables {
    cpu_node_group = { instance_types = ["m7i.2xlarge"], min_size = 0, max_size = 3, desired_size = 0, disk_size_gib = 100 }
  }
  expect_failures = [var.cpu_node_group]
}

run "zones_of_another_region" {
  command = plan
  variables {
    availability_zones = ["us-west-2a", "us-west-2b"]
  }
  expect_failures = [var.availability_zones]
}

run "redis_without_a_replica" {
  command = plan
  variables {
    redis_replicas = 0
  }
  expect_failures = [var.redis_replicas]
}

run "bad_name" {
  command = plan
  variables {
    name = "Imagine_Prod"
  }
  expect_failures = [var.name]
}

run "prefix_with_slashes" {
  command = plan
  variables {
    artifact_prefix = "/imagine/"
  }
  expect_failures = [var.artifact_prefix]
}
