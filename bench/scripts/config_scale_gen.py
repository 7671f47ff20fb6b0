"""100 tenants x N global tool rules (every 10th with a rate and an argument pattern), for
bench/scripts/config_scale.sh. Usage: config_scale_gen.py TENANTS RULES PORT ADMIN_PORT"""
import sys
tenants, rules = int(sys.argv[1]), int(sys.argv[2])
port, admin = sys.argv[3], sys.argv[4]
out = [f'''[gateway]
instance = "cs{port}"
workers = 1
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
default_tenant = "t0"
[state]
path = "/tmp/config-scale-state"
''']
for t in range(tenants):
    out.append(f'[[tenants]]\nname = "t{t}"\nid = {t+1}\nsources = ["10.{t//250}.{t%250}.0/24"]\n')
out.append('[policy]\ndefault_action = "allow"\n')
for r in range(rules):
    if r % 10 == 0:
        out.append(f'[[policy.tools]]\nmatch = "up/tool_{r}_*"\naction = "allow"\nrequests_per_sec = 100\n[[policy.tools.arguments]]\npointer = "/path"\npattern = "^/srv/data{r}/[a-z0-9_/]+$"\n')
    else:
        out.append(f'[[policy.tools]]\nmatch = "tool_{r}_*"\naction = "{"deny" if r % 3 == 0 else "allow"}"\n')
out.append('[[upstreams]]\nname = "up"\nurl = "http://127.0.0.1:9/mcp"\n[[routes]]\npath = "/mcp"\nupstream = "up"\n')
print("\n".join(out))
