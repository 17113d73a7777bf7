#!/bin/sh
# docker-entrypoint-initdb.d hook of the warehouse database: the least-privilege roles.
# Passwords come from Docker secrets (files), never from the environment of the compose file.
set -eu
export ATP_OWNER_ROLE="${ATP_OWNER_ROLE:-atp_owner}"
export ATP_SCORING_ROLE="${ATP_SCORING_ROLE:-atp_scoring}"
export ATP_TRAINING_ROLE="${ATP_TRAINING_ROLE:-atp_training}"
ATP_OWNER_PASSWORD="$(cat /run/secrets/warehouse_owner_password)"
ATP_SCORING_PASSWORD="$(cat /run/secrets/warehouse_scoring_password)"
ATP_TRAINING_PASSWORD="$(cat /run/secrets/warehouse_training_password)"
export ATP_OWNER_PASSWORD ATP_SCORING_PASSWORD ATP_TRAINING_PASSWORD
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -f /opt/atp/warehouse-roles.sql
