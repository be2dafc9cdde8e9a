// marathon_sd fetches /v2/apps/?embed=apps.tasks as Prometheus's marathon_sd_configs does and decodes it into the
// same shapes (discovery/marathon/marathon.go: appList, app, task, container, portMapping, portDefinition),
// then prints the targets it would scrape: one "app host:port" line per task port. Standard library only.
//
// Usage: marathon_sd BASE_URL
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
)

type ipAddress struct {
	Address string `json:"ipAddress"`
	Proto   string `json:"protocol"`
}

type task struct {
	ID          string      `json:"id"`
	Host        string      `json:"host"`
	Ports       []uint32    `json:"ports"`
	IPAddresses []ipAddress `json:"ipAddresses"`
}

type portMapping struct {
	Labels        map[string]string `json:"labels"`
	ContainerPort uint32            `json:"containerPort"`
	HostPort      uint32            `json:"hostPort"`
	ServicePort   uint32            `json:"servicePort"`
}

type dockerContainer struct {
	Image        string        `json:"image"`
	PortMappings []portMapping `json:"portMappings"`
}

type container struct {
	Docker       dockerContainer `json:"docker"`
	PortMappings []portMapping   `json:"portMappings"`
}

type portDefinition struct {
	Labels map[string]string `json:"labels"`
	Port   uint32            `json:"port"`
}

type network struct {
	Name string `json:"name"`
	Mode string `json:"mode"`
}

type app struct {
	ID              string            `json:"id"`
	Tasks           []task            `json:"tasks"`
	RunningTasks    int               `json:"tasksRunning"`
	Labels          map[string]string `json:"labels"`
	Container       container         `json:"container"`
	PortDefinitions []portDefinition  `json:"portDefinitions"`
	Networks        []network         `json:"networks"`
	RequirePorts    bool              `json:"requirePorts"`
}

type appList struct {
	Apps []app `json:"apps"`
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: marathon_sd BASE_URL")
		os.Exit(2)
	}
	url := strings.TrimRight(os.Args[1], "/") + "/v2/apps/?embed=apps.tasks"
	resp, err := http.Get(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		fmt.Fprintf(os.Stderr, "non 2xx status '%d' response during marathon service discovery\n", resp.StatusCode)
		os.Exit(1)
	}
	var apps appList
	if err := json.Unmarshal(body, &apps); err != nil {
		fmt.Fprintf(os.Stderr, "%q: %v\n", url, err)
		os.Exit(1)
	}
	for _, a := range apps.Apps {
		for _, t := range a.Tasks {
			for i, port := range t.Ports {
				if i < len(a.PortDefinitions) {
					fmt.Printf("%s %s:%d\n", a.ID, t.Host, port)
				}
			}
		}
	}
}
