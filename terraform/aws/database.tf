# The job store: PostgreSQL on RDS (jobs, ledger, webhook outbox; Alembic migrates it). Private subnets only,
# reachable from the EKS nodes' security group only, TLS enforced, encrypted with the deployment key, master
# password generated and rotated by RDS in Secrets Manager (never in this state or in a tfvars file).
# Reference design: terraform-aws-modules/rds (modules/db_instance, modules/db_subnet_group, db_parameter_group).

resource "aws_db_subnet_group" "jobs" {
  name        = "${var.name}-jobs"
  description = "Private subnets of the ${var.name} job store"
  subnet_ids  = [for s in aws_subnet.private : s.id]
}

resource "aws_security_group" "database" {
  name        = "${var.name}-jobs-db"
  description = "PostgreSQL job store of ${var.name}: port 5432 from the EKS node security group only"
  vpc_id      = aws_vpc.this.id

  tags = { Name = "${var.name}-jobs-db" }
}

resource "aws_vpc_security_group_ingress_rule" "database_from_nodes" {
  security_group_id            = aws_security_group.database.id
  description                  = "PostgreSQL from EKS nodes (the Ray pods)"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = aws_security_group.node.id
}

resource "aws_db_parameter_group" "jobs" {
  name_prefix = "${var.name}-jobs-pg17-"
  family      = "postgres17"
  description = "${var.name} job store: TLS only, connection and slow-statement logging"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
  parameter {
    name  = "log_connections"
    value = "1"
  }
  parameter {
    name  = "log_disconnections"
    value = "1"
  }
  parameter {
    name  = "log_min_duration_statement"
    value = "1000" # ms: statements slower than a second (the job store's queries are point reads and short writes)
  }
  parameter {
    name  = "log_statement"
    value = "ddl" # migrations show up in the log; row data does not
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name = "${var.name}-rds-monitoring"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "monitoring.rds.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "jobs" {
  identifier     = "${var.name}-jobs"
  engine         = "postgres"
  engine_version = "17" # major only: RDS picks the current minor and auto_minor_version_upgrade keeps it patched
  instance_class = var.database_instance_class

  db_name  = "imagine"
  username = "imagine"
  port     = 5432
  # RDS generates the password, stores it in Secrets Manager under the deployment key and rotates it;
  # aws-addons reads it from there into the Kubernetes Secret that carries IMAGINE_DATABASE_URL.
  manage_master_user_password   = true
  master_user_secret_kms_key_id = aws_kms_key.this.key_id

  allocated_storage     = var.database_allocated_storage_gib
  max_allocated_storage = var.database_allocated_storage_gib * 10
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.this.arn

  db_subnet_group_name   = aws_db_subnet_group.jobs.name
  vpc_security_group_ids = [aws_security_group.database.id]
  publicly_accessible    = false
  multi_az               = var.database_multi_az
  network_type           = "IPV4"
  ca_cert_identifier     = "rds-ca-rsa2048-g1"
  parameter_group_name   = aws_db_parameter_group.jobs.name

  iam_database_authentication_enabled = true
  auto_minor_version_upgrade          = true
  allow_major_version_upgrade         = false
  apply_immediately                   = false
  maintenance_window                  = "sun:05:00-sun:06:00"

  backup_retention_period   = var.database_backup_retention_days
  backup_window             = "03:00-04:00"
  copy_tags_to_snapshot     = true
  delete_automated_backups  = false
  deletion_protection       = var.database_deletion_protection
  skip_final_snapshot       = false
  final_snapshot_identifier = "${var.name}-jobs-final"

  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.this.arn
  performance_insights_retention_period = 7

  depends_on = [aws_iam_role_policy_attachment.rds_monitoring]
}
