-- Run once by the postgres image when its data volume is new
-- (/docker-entrypoint-initdb.d): a role Grafana's Postgres datasource logs in as. It can
-- read every table the migrations create later (default privileges of the owner,
-- taskpod) and nothing else, and its sessions are read-only.
-- The password matches GRAFANA_POSTGRES_PASSWORD in docker-compose.yaml; a development
-- stack only.
CREATE ROLE grafana_reader LOGIN PASSWORD 'grafana-reader'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
ALTER ROLE grafana_reader SET statement_timeout = '10s';
GRANT CONNECT ON DATABASE taskpod TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE taskpod IN SCHEMA public
    GRANT SELECT ON TABLES TO grafana_reader;
